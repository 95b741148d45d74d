"""Action logs for ``WorkflowService`` (edge layer): journalled tails and live output.

:func:`recorded_attempts` reads the tails each attempt's result journalled (``GetActionLogs``).
:func:`follow_action_logs` streams one attempt's output while it runs, from the coordinator's
in-memory :class:`~plait.coordinator.live_logs.LiveLogs`, and ends with its tails
(``FollowActionLogs``); any in-process caller (the web UI) may iterate it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from plait.coordinator.core.model import ActionRecord, LeaseRecord
from plait.coordinator.core.transitions import TERMINAL
from plait.coordinator.live_logs import AttemptLog
from plait.coordinator.runtime import Runtime
from plait.errors import FieldViolation, InvalidArgumentError, NotFoundError, UnavailableError
from plait.ids import describe_id
from plait.live_logs import STDERR, STDOUT
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb

__all__ = ["follow_action_logs", "recorded_attempts"]

E = pb  # EVENT_TYPE_* constants
PAGE = 5000  # journal events read at a time
RESPONSE_BYTES = 1 << 20  # output per FollowActionLogs response, about
# How often a follower checks that the core still holds its lease, in case no record said it
# ended (a safety net: the record that ends a lease closes its log at once).
CHECK_INTERVAL = 5.0
MAX_ATTEMPT = 1_000_000
MAX_ACTION_ID = 1024


async def recorded_attempts(
    runtime: Runtime, workflow_id: str, action_id: str, after: int = 0
) -> list[wspb.AttemptLogs]:
    """Every attempt of the action that reported a result, oldest first, with its tails (only
    those journalled after sequence ``after``)."""
    out: list[wspb.AttemptLogs] = []
    last = after
    while True:
        page = await runtime.store.read(workflow_id, last, PAGE)
        for ev in page:
            if (
                ev.action_id == action_id
                and ev.type in (E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_RETRY_SCHEDULED)
                and ev.lease_id
            ):
                out.append(
                    wspb.AttemptLogs(
                        attempt=ev.attempt,
                        fencing_token=ev.fencing_token,
                        worker_id=ev.worker_id,
                        stdout_tail=ev.stdout_tail,
                        stderr_tail=ev.stderr_tail,
                        state=ev.action_state,
                    )
                )
        if len(page) < PAGE:
            return out
        last = page[-1].sequence


def _action(runtime: Runtime, workflow_id: str, action_id: str) -> ActionRecord:
    wf = runtime.state.workflows.get(workflow_id)
    if wf is None:
        raise NotFoundError(f"workflow {workflow_id!r} not found")
    a = wf.actions.get(action_id)
    if a is None:
        raise NotFoundError(f"action {action_id[:256]!r} not found in workflow {workflow_id!r}")
    return a


def _live(a: ActionRecord, attempt: int) -> LeaseRecord | None:
    """The action's live lease of ``attempt`` (0: its primary one), if it has one."""
    if attempt == 0:
        return a.lease
    for lease in (a.lease, a.hedge):
        if lease is not None and lease.attempt == attempt:
            return lease
    return None


def check_follow(request: wspb.FollowActionLogsRequest) -> None:
    """INVALID_ARGUMENT naming each bad field of a FollowActionLogs request."""
    v = []
    why = describe_id(request.workflow_id)
    if why:
        v.append(FieldViolation("workflow_id", why))
    if not request.action_id or len(request.action_id) > MAX_ACTION_ID:
        v.append(FieldViolation("action_id", f"must be 1 to {MAX_ACTION_ID} characters"))
    if request.attempt > MAX_ATTEMPT:
        v.append(FieldViolation("attempt", f"is {request.attempt}; the limit is {MAX_ATTEMPT}"))
    if v:
        raise InvalidArgumentError(v)


async def follow_action_logs(
    runtime: Runtime, request: wspb.FollowActionLogsRequest
) -> AsyncIterator[wspb.FollowActionLogsResponse]:
    """One attempt's output as it arrives, then a last message (``ended``) with its tails and
    the action's state (see ``FollowActionLogs`` in proto/plait/v1/workflow_service.proto).

    Responses are not stamped: the caller stamps them with the coordinator's HLC.

    Raises:
        InvalidArgumentError: a malformed request.
        NotFoundError: no such workflow or action.
        UnavailableError: the coordinator is stopping.
    """
    check_follow(request)
    workflow_id, action_id, attempt = request.workflow_id, request.action_id, request.attempt
    live = runtime.live_logs
    while True:
        a = _action(runtime, workflow_id, action_id)
        lease = _live(a, attempt)
        if lease is not None:
            break
        if a.state in TERMINAL or (attempt and attempt <= a.attempt):
            # Ended (or never ran, for an action that ended without running): its tails.
            async for resp in _last(runtime, a, attempt or a.attempt):
                yield resp
            return
        with live.waiting(workflow_id, action_id) as started:  # the next record of the action
            await _changed(started)
        if live.closed:
            raise UnavailableError("the coordinator is stopping; follow the logs again shortly")
    since = runtime.state.sequence  # the attempt's end is journalled after this
    log = live.follow(
        lease.lease_id,
        workflow_id,
        action_id,
        lease.attempt,
        lease.token,
        lease.worker.worker_id,
    )
    try:
        async for resp in _stream(runtime, log, request):
            yield resp
    finally:
        live.unfollow(log)
    if live.closed:
        raise UnavailableError("the coordinator is stopping; follow the logs again shortly")
    a = _action(runtime, workflow_id, action_id)
    async for resp in _last(runtime, a, log.attempt, log, since):
        yield resp


async def _changed(event: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), CHECK_INTERVAL)


async def _stream(
    runtime: Runtime, log: AttemptLog, request: wspb.FollowActionLogsRequest
) -> AsyncIterator[wspb.FollowActionLogsResponse]:
    """The log's output until its attempt ends."""
    offsets = {STDOUT: request.stdout_offset, STDERR: request.stderr_offset}
    cursor = 0
    gone = 0  # checks that found the lease no longer held
    while True:
        seen, ended = log.version, log.ended
        chunks, cursor = log.read(cursor, offsets)
        while chunks:
            resp = _head(log)
            size = 0
            while chunks and (size == 0 or size + len(chunks[0].data) <= RESPONSE_BYTES):
                size += len(chunks[0].data)
                resp.chunks.append(chunks.pop(0))
            yield resp
        if ended:
            return
        await log.changed(seen, CHECK_INTERVAL)
        if not log.ended and log.lease_id not in runtime.state.leases:
            gone += 1
            if gone >= 2:  # ended, and no record closed it: read the journal once it is durable
                await runtime.durable(runtime.state.sequence)
                runtime.live_logs.end_stale(log)


def _head(log: AttemptLog) -> wspb.FollowActionLogsResponse:
    return wspb.FollowActionLogsResponse(
        attempt=log.attempt, fencing_token=log.token, worker_id=log.worker_id
    )


async def _last(
    runtime: Runtime,
    a: ActionRecord,
    attempt: int,
    log: AttemptLog | None = None,
    since: int = 0,
) -> AsyncIterator[wspb.FollowActionLogsResponse]:
    """The last message: the attempt's journalled tails (if it reported a result: looked for
    after sequence ``since``) and the action's state."""
    state = a.state
    await runtime.durable(runtime.state.sequence)
    recorded = await recorded_attempts(runtime, a.workflow.workflow_id, a.spec.id, since)
    if log is not None:
        resp = _head(log)
        tails = [t for t in recorded if t.fencing_token == log.token]
    else:
        resp = wspb.FollowActionLogsResponse(attempt=attempt)
        tails = [t for t in recorded if t.attempt == attempt]
    if tails:
        resp.tails.CopyFrom(tails[-1])
        resp.fencing_token = tails[-1].fencing_token
        resp.worker_id = tails[-1].worker_id
    resp.ended = True
    resp.action_state = state  # type: ignore[assignment]
    yield resp
