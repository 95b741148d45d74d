"""``plait.Client``: submit, inspect and watch workflows over gRPC (SDK layer).

A thin, synchronous wrapper over ``WorkflowService`` and ``AdminService``. It keeps a hybrid
logical clock: every request carries the client's reading and every response's reading is
merged, so what a client does after seeing an event is ordered after that event. gRPC errors
come back as :mod:`plait.errors` exceptions; an unreachable coordinator is
:class:`plait.errors.UnavailableError`.

The target may list several coordinators (``a:7450,b:7450``; see :mod:`plait.endpoints`). A
call answered ``UNAVAILABLE`` -- a standby's ``NOT_LEADER`` refusal, or an address that does not
answer -- is tried again on the leader the standby named (if it is listed, or proves over TLS
to be a coordinator: :mod:`plait.endpoints`), else on the next address, within a bounded number
of hops, but only when repeating it cannot do anything twice: reads, watches, cancel and drain
(idempotent), and submit, which always carries an idempotency key (one is generated per
:meth:`Client.submit` call when the caller gives none).

Transport: with TLS files (the ``tls`` argument, else ``PLAIT_TLS_CA``/``_CERT``/``_KEY``/
``_SERVER_NAME``) every channel is TLS, with a client certificate when one is given; without,
plaintext. A bearer token (``token``, else ``$PLAIT_TOKEN``) is never sent in plaintext beyond
loopback: such a client refuses to start (:class:`plait.errors.ConfigError`).
"""

from __future__ import annotations

import builtins
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import grpc

from plait.clock import Clock
from plait.connection import (
    MAX_MESSAGE_BYTES,
    Connection,
    Link,
    channel_options,
    resolve_target,
)
from plait.endpoints import DEFAULT_TARGET
from plait.errors import (
    FieldViolation,
    InvalidArgumentError,
    PlaitError,
    from_rpc_error,
)
from plait.outage import Outage
from plait.results import (
    WorkflowResult,
    WorkflowState,
    parse_action_state,
    parse_workflow_state,
)
from plait.security import TlsFiles
from plait.submission import STREAM_ABOVE_BYTES, SubmitLimits, check_spec, stream_requests
from plait.tracecontext import describe_traceparent, format_traceparent
from plait.v1 import (
    admin_service_pb2,
    workflow_pb2,
    workflow_service_pb2,
)

__all__ = [
    "DEFAULT_TARGET",
    "MAX_MESSAGE_BYTES",
    "TERMINAL_WORKFLOW_STATES",
    "Client",
    "channel_options",
    "parse_action_state",
    "parse_workflow_state",
    "resolve_target",
]

log = logging.getLogger(__name__)

TERMINAL_WORKFLOW_STATES = frozenset(
    {
        workflow_pb2.WORKFLOW_STATE_SUCCEEDED,
        workflow_pb2.WORKFLOW_STATE_FAILED,
        workflow_pb2.WORKFLOW_STATE_CANCELLED,
    }
)


class _ToSpec(Protocol):
    def to_spec(self) -> workflow_pb2.WorkflowSpec: ...


class Client(Connection):
    """A synchronous client of a coordinator (or of several: a leader and its standbys).

    Args:
        target: ``host:port`` of the coordinator, or several comma-separated; defaults to
            ``$PLAIT_COORDINATOR``, then ``127.0.0.1:7450``. A malformed entry raises
            :class:`plait.endpoints.TargetError` (``--coordinator: 'x' is not HOST:PORT``).
        clock: time source of the client's HLC (tests inject a manual clock).
        timeout: deadline in seconds of each unary call, redirects included (``None``: none).
        token: bearer token sent with every call; defaults to ``$PLAIT_TOKEN``.
        tls: CA (and optionally client certificate and key) for TLS channels; defaults to
            :func:`plait.security.tls_from_env` (``PLAIT_TLS_CA``...), else plaintext.
            ``False``: plaintext whatever the environment says (an embedded loopback
            coordinator, as ``plait run`` starts).
        max_hops: how many times one call may move to another address (``None``: twice the
            number of addresses, plus one; at least 3).
        submit_limits: what :meth:`submit` checks a spec against before sending it (actions,
            spec bytes, input bytes); defaults to the coordinator's defaults, or the
            ``PLAIT_MAX_ACTIONS``/``_SPEC_BYTES``/``_INPUT_BYTES`` variables
            (:meth:`plait.submission.SubmitLimits.from_env`).

    Raises:
        ConfigError: a token would go in plaintext to a host beyond loopback, or a TLS file
            from the environment is missing.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = 30.0,
        token: str | None = None,
        tls: TlsFiles | Literal[False] | None = None,
        max_hops: int | None = None,
        submit_limits: SubmitLimits | None = None,
    ) -> None:
        super().__init__(
            target, clock=clock, timeout=timeout, token=token, tls=tls, max_hops=max_hops
        )
        self.submit_limits = submit_limits or SubmitLimits.from_env()

    # -- workflows ------------------------------------------------------------------------

    def submit(
        self,
        workflow: workflow_pb2.WorkflowSpec | _ToSpec | str | os.PathLike[str],
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> workflow_service_pb2.SubmitWorkflowResponse:
        """Submits a spec, a :class:`plait.Workflow`, or the path of a YAML workflow file.

        Returns the response: ``workflow_id`` and ``created`` (false when the idempotency key
        matched an existing workflow).

        Without an ``idempotency_key`` one is generated for this call, so that trying it again
        on another coordinator (after a standby's refusal or a lost connection) can never
        create two workflows; a workflow found under a generated key was created by this very
        call, so ``created`` is then true.

        ``traceparent``: a W3C trace context the workflow's span becomes a child of (its trace
        id is then the workflow's). By default, the current OpenTelemetry span's, when
        ``opentelemetry`` is installed and a span is current; ``""`` gives none.

        The spec is checked against :attr:`submit_limits` first (more actions than
        ``max_actions``, more bytes than ``max_spec_bytes``, an input over ``max_input_bytes``
        raise :class:`~plait.errors.InvalidArgumentError` naming the field and the limit, with
        nothing sent). One larger than a gRPC message goes through ``SubmitWorkflowStream`` in
        1 MiB pieces (:mod:`plait.submission`); the answer is the same.
        """
        if traceparent is None:
            traceparent = _current_traceparent()
        elif traceparent:
            why = describe_traceparent(traceparent)
            if why:
                raise InvalidArgumentError([FieldViolation("traceparent", why)])
        if isinstance(workflow, workflow_pb2.WorkflowSpec):
            spec = workflow
        elif isinstance(workflow, str | os.PathLike | Path):
            from plait.spec import load_workflow

            spec = load_workflow(workflow)
        else:
            spec = workflow.to_spec()
        size = check_spec(spec, self.submit_limits)  # before anything is sent
        generated = not idempotency_key
        key = idempotency_key or f"plait-submit-{uuid.uuid4().hex}"
        request = workflow_service_pb2.SubmitWorkflowRequest(
            spec=spec, idempotency_key=key, traceparent=traceparent
        )
        if size > STREAM_ABOVE_BYTES:
            response = self._submit_stream(request, size)
        else:
            response = self._call(lambda c: c.workflows.SubmitWorkflow, request)
        if generated and not response.created:
            # An earlier try of this call reached the leader before its answer was lost.
            response.created = True
        return response

    def _submit_stream(
        self, request: workflow_service_pb2.SubmitWorkflowRequest, size: int
    ) -> workflow_service_pb2.SubmitWorkflowResponse:
        """A spec too large for one message, in pieces (plait.submission): the same answer."""

        def rpc(link: Link) -> Callable[..., Any]:
            def send(req: workflow_service_pb2.SubmitWorkflowRequest, **kw: Any) -> Any:
                return link.workflows.SubmitWorkflowStream(stream_requests(req), **kw)

            return send

        try:
            streamed = self._call(rpc, request)
        except PlaitError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "spec",
                        f"is {size:,} bytes, more than one message carries"
                        f" ({STREAM_ABOVE_BYTES:,}), and the coordinator at {self.target} does"
                        " not take a spec in pieces (SubmitWorkflowStream): upgrade it",
                    )
                ]
            ) from None
        return workflow_service_pb2.SubmitWorkflowResponse(
            hlc=streamed.hlc, workflow_id=streamed.workflow_id, created=streamed.created
        )

    def run(
        self,
        workflow: workflow_pb2.WorkflowSpec | _ToSpec | str | os.PathLike[str],
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> WorkflowResult:
        """Submits ``workflow``, waits for it to finish, and returns its result with named
        states and parsed outputs (``result.state == "SUCCEEDED"``, ``result.outputs("id")``).

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the workflow goes on).
        """
        response = self.submit(workflow, idempotency_key=idempotency_key)
        return WorkflowResult.from_status(self.wait(response.workflow_id, timeout=timeout))

    def get(
        self,
        workflow_id: str,
        *,
        states: Iterable[str | int] = (),
        limit: int | None = None,
    ) -> workflow_pb2.WorkflowStatus:
        """The workflow's status with every action (``NotFoundError`` for an unknown id).

        ``states`` (``"ready"``, ``"ACTION_STATE_READY"`` or the enum values) keeps only the
        actions in one of them; ``limit`` keeps the first that many (``None``: all). Either way
        ``action_counts`` describes the whole workflow, so what was left out can be counted.

        Follows GetWorkflow's pages (each response fits one message): the actions of every
        page, the rest from the last one. Outputs too large for any page come with
        ``outputs_truncated`` set and ``outputs_bytes`` their size: read them with
        :meth:`outputs`.
        """
        wanted = frozenset(parse_action_state(s) for s in states)
        pages: builtins.list[workflow_pb2.WorkflowStatus] = []
        token = ""
        left = limit
        while True:
            request = workflow_service_pb2.GetWorkflowRequest(
                workflow_id=workflow_id,
                page_token=token,
                page_size=0 if left is None else max(left, 1),
                states=sorted(wanted),
            )
            response: workflow_service_pb2.GetWorkflowResponse = self._call(
                lambda c: c.workflows.GetWorkflow, request
            )
            page = response.workflow
            if wanted:  # a coordinator that predates the filter sends every action
                kept = [a for a in page.actions if a.state in wanted]
                if len(kept) < len(page.actions):
                    del page.actions[:]
                    page.actions.extend(kept)
            if left is not None:
                del page.actions[left:]
                left -= len(page.actions)
            pages.append(page)
            token = response.next_page_token
            if not token or left == 0:
                break
        if len(pages) == 1:
            return pages[0]
        status = workflow_pb2.WorkflowStatus()
        status.CopyFrom(pages[-1])
        del status.actions[:]
        for page in pages:
            status.actions.extend(page.actions)
        return status

    def outputs(self, workflow_id: str, action_id: str) -> str:
        """One action's committed outputs, whole, as JSON text ("" when it has none yet).

        However large (a map's collected outputs may pass any message limit): read in chunks
        with GetActionOutputs.
        """
        chunks: builtins.list[bytes] = []
        offset = 0
        while True:
            request = workflow_service_pb2.GetActionOutputsRequest(
                workflow_id=workflow_id, action_id=action_id, offset=offset
            )
            response: workflow_service_pb2.GetActionOutputsResponse = self._call(
                lambda c: c.workflows.GetActionOutputs, request
            )
            chunks.append(response.chunk)
            offset += len(response.chunk)
            if offset >= response.outputs_bytes or not response.chunk:
                return b"".join(chunks).decode()

    def list(
        self, state: str | int | None = None, page_size: int = 100
    ) -> list[workflow_pb2.WorkflowStatus]:
        """Every workflow (newest first), optionally only those in ``state``; follows pages."""
        wanted = parse_workflow_state(state)
        out: list[workflow_pb2.WorkflowStatus] = []
        token = ""
        while True:
            request = workflow_service_pb2.ListWorkflowsRequest(
                page_size=page_size, page_token=token, state=wanted
            )
            page: workflow_service_pb2.ListWorkflowsResponse = self._call(
                lambda c: c.workflows.ListWorkflows, request
            )
            out.extend(page.workflows)
            token = page.next_page_token
            if not token:
                return out

    def cancel(self, workflow_id: str, reason: str = "") -> int:
        """Cancels a workflow; returns its state after the request: a :class:`WorkflowState`
        (an ``int`` equal to the protocol's number, and to its name: ``== "CANCELLED"``)."""
        request = workflow_service_pb2.CancelWorkflowRequest(workflow_id=workflow_id, reason=reason)
        response: workflow_service_pb2.CancelWorkflowResponse = self._call(
            lambda c: c.workflows.CancelWorkflow, request
        )
        try:
            return WorkflowState(response.state)
        except ValueError:  # a state this client does not know yet
            return response.state

    def retry(self, workflow_id: str) -> builtins.list[str]:
        """Re-runs what did not succeed in a finished workflow; returns the action ids reset.

        Safe to repeat: a workflow already running again answers FAILED_PRECONDITION.
        """
        request = workflow_service_pb2.RetryWorkflowRequest(workflow_id=workflow_id)
        response: workflow_service_pb2.RetryWorkflowResponse = self._call(
            lambda c: c.workflows.RetryWorkflow, request
        )
        return list(response.action_ids)

    def watch(
        self,
        workflow_id: str,
        after_sequence: int = 0,
        follow: bool = True,
        *,
        reconnect: float | None = None,
        on_reconnect: Callable[[str], object] | None = None,
    ) -> Iterator[workflow_pb2.HistoryEvent]:
        """The workflow's history after ``after_sequence`` in HLC order, then (``follow``) live
        events until it finishes. Closing the iterator cancels the stream.

        A stream that breaks (``UNAVAILABLE``: a restart, a failover) is opened again on the
        leader and resumes after the last event yielded, so no event is seen twice or skipped.
        ``reconnect``: seconds to keep trying, once a coordinator has taken the watch, when no
        listed coordinator answers (a restart under way) before
        :class:`~plait.errors.UnavailableError`; ``None``: only the bounded hops every call
        makes. A coordinator unreachable from the start fails at once, as any call does.
        ``on_reconnect`` is given one line for people per outage.
        """
        return self._watch(workflow_id, after_sequence, follow, None, reconnect, on_reconnect)

    def _watch(
        self,
        workflow_id: str,
        after_sequence: int,
        follow: bool,
        deadline: float | None,
        reconnect: float | None = None,
        on_reconnect: Callable[[str], object] | None = None,
    ) -> Iterator[workflow_pb2.HistoryEvent]:
        # A watch that loses its coordinator (a failover, a restart) re-opens on the leader
        # and resumes after the last event it yielded, so no event is seen twice or skipped.
        deadline_at = None if deadline is None else self._clock.monotonic() + deadline
        failover = self._failover()
        outage = Outage(self._clock, self._sleep, reconnect, deadline_at)
        last = after_sequence
        last_type = 0
        resumed = False
        while True:
            request = workflow_service_pb2.WatchWorkflowRequest(
                workflow_id=workflow_id, after_sequence=last, follow=follow
            )
            self.hlc.stamp(request.hlc)
            remaining = (
                None if deadline_at is None else max(0.0, deadline_at - self._clock.monotonic())
            )
            call = self._link().workflows.WatchWorkflow(
                request, timeout=remaining, metadata=self._metadata
            )
            try:
                # A coordinator sends the stream's headers as soon as it accepts the watch:
                # from then on this address serves it, and a later break is a new outage.
                call.initial_metadata()
                if not call.done():  # type: ignore[attr-defined]  # the call is a grpc.Future too
                    outage.served()
                    failover.progressed()
                for response in call:
                    self._observe(response.hlc)
                    failover.progressed()
                    # The coordinator sends the events of one journal commit together.
                    for event in response.events:
                        if resumed and event.sequence <= last:
                            continue
                        last = max(last, event.sequence)
                        last_type = event.type
                        yield event
                return
            except grpc.RpcError as err:
                if follow and last_type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
                    return  # it broke as it was ending: the workflow finished
                lost = f"{self.target}: {from_rpc_error(err).message or 'unavailable'}"
                first = outage.begin()
                if not self._hop(failover, err, deadline_at):
                    if not outage.pause(err):
                        raise self._error(err) from None
                    failover = self._failover()
                if first and outage.was_served and on_reconnect is not None:
                    wait = f" for up to {reconnect:g}s" if reconnect else ""
                    on_reconnect(
                        f"lost the coordinator ({lost}); reconnecting{wait} to resume after"
                        f" event {last}"
                    )
                resumed = True
                log.info("resuming the watch of %s after sequence %d", workflow_id, last)
            finally:
                call.cancel()

    def wait(
        self,
        workflow_id: str,
        timeout: float | None = None,
        *,
        reconnect: float | None = None,
        on_reconnect: Callable[[str], object] | None = None,
    ) -> workflow_pb2.WorkflowStatus:
        """Blocks until the workflow is terminal and returns its final status.

        ``reconnect`` and ``on_reconnect``: as for :meth:`watch` (riding out a restart).

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline_at = None if timeout is None else self._clock.monotonic() + timeout
        last = 0
        while True:
            remaining = None if deadline_at is None else deadline_at - self._clock.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"workflow {workflow_id} did not finish within {timeout:g}s")
            finished = False
            try:
                # Read to the end of the stream: a retried workflow's history holds an earlier
                # WORKFLOW_FINISHED; the coordinator ends the stream at the current one.
                for event in self._watch(
                    workflow_id, last, True, remaining, reconnect, on_reconnect
                ):
                    last = max(last, event.sequence)
                    finished = event.type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED
            except PlaitError as exc:
                if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(
                        f"workflow {workflow_id} did not finish within {timeout:g}s"
                    ) from None
                raise
            status = self.get(workflow_id)
            if finished or status.state in TERMINAL_WORKFLOW_STATES:
                return status
            # The stream ended early (e.g. the coordinator restarted): resume after `last`.

    def logs(
        self, workflow_id: str, action_id: str
    ) -> builtins.list[workflow_service_pb2.AttemptLogs]:
        """The recorded stdout/stderr tails of each attempt of an action, oldest first."""
        request = workflow_service_pb2.GetActionLogsRequest(
            workflow_id=workflow_id, action_id=action_id
        )
        response: workflow_service_pb2.GetActionLogsResponse = self._call(
            lambda c: c.workflows.GetActionLogs, request
        )
        return list(response.attempts)

    def follow_logs(
        self, workflow_id: str, action_id: str, attempt: int = 0
    ) -> Iterator[workflow_service_pb2.FollowActionLogsResponse]:
        """One attempt's output while it runs (``attempt`` 0: the one running now, else the
        next to start), as ``FollowActionLogsResponse`` messages: ``chunks`` of stdout/stderr
        with their byte offsets, then a last one with ``ended`` set, the attempt's ``tails``
        (when it reported a result) and the action's ``action_state`` (not terminal: another
        attempt follows). A lost coordinator is followed to the next address, resuming after
        the offsets seen. Closing the iterator cancels the stream."""
        failover = self._failover()
        offsets = {workflow_pb2.LOG_STREAM_STDOUT: 0, workflow_pb2.LOG_STREAM_STDERR: 0}
        while True:
            request = workflow_service_pb2.FollowActionLogsRequest(
                workflow_id=workflow_id,
                action_id=action_id,
                attempt=attempt,
                stdout_offset=offsets[workflow_pb2.LOG_STREAM_STDOUT],
                stderr_offset=offsets[workflow_pb2.LOG_STREAM_STDERR],
            )
            self.hlc.stamp(request.hlc)
            call = self._link().workflows.FollowActionLogs(request, metadata=self._metadata)
            try:
                for response in call:
                    self._observe(response.hlc)
                    failover.progressed()
                    attempt = attempt or response.attempt  # a resumed stream: the same attempt
                    for c in response.chunks:
                        offsets[c.stream] = c.offset + len(c.data)
                    yield response
                return
            except grpc.RpcError as err:
                if not self._hop(failover, err, None):
                    raise self._error(err) from None
            finally:
                call.cancel()

    # -- workers --------------------------------------------------------------------------

    def workers(self) -> builtins.list[admin_service_pb2.WorkerInfo]:
        """The connected workers."""
        return list(self.list_workers().workers)

    def list_workers(self) -> admin_service_pb2.ListWorkersResponse:
        """The connected workers and the revoked worker ids, in one call."""
        response: admin_service_pb2.ListWorkersResponse = self._call(
            lambda c: c.admin.ListWorkers, admin_service_pb2.ListWorkersRequest()
        )
        return response

    def revoke(self, worker_id: str, reason: str = "") -> admin_service_pb2.RevokeWorkerResponse:
        """Cuts a worker off now and refuses its id until :meth:`reinstate` (role operate).

        Its stream ends, its leases run elsewhere, and the revocation survives restarts and
        failovers. Repeating it changes nothing but the reason, so it follows the leader too.
        """
        response: admin_service_pb2.RevokeWorkerResponse = self._call(
            lambda c: c.admin.RevokeWorker,
            admin_service_pb2.RevokeWorkerRequest(worker_id=worker_id, reason=reason),
        )
        return response

    def reinstate(self, worker_id: str) -> bool:
        """Accepts a revoked worker id again; False when it was not revoked (role operate)."""
        response: admin_service_pb2.ReinstateWorkerResponse = self._call(
            lambda c: c.admin.ReinstateWorker,
            admin_service_pb2.ReinstateWorkerRequest(worker_id=worker_id),
        )
        return response.was_revoked

    def drain(self, worker_id: str) -> None:
        """Asks a worker to take no new work, finish what it holds and leave.

        Idempotent (draining a draining worker changes nothing), so it follows the leader too.
        """
        self._call(
            lambda c: c.admin.DrainWorker, admin_service_pb2.DrainWorkerRequest(worker_id=worker_id)
        )


def _current_traceparent() -> str:
    """The traceparent of the caller's current OpenTelemetry span ("" when there is none, or
    when opentelemetry is not installed)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return ""
    return format_traceparent(sc.trace_id, sc.span_id, sc.trace_flags.sampled)
