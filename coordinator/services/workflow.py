"""``plait.v1.WorkflowService`` (edge layer): thin; validation and state live in the core."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from google.protobuf.message import DecodeError

from plait.coordinator.config import MAX_MESSAGE_BYTES, Limits
from plait.coordinator.core import views
from plait.coordinator.core.events import CancelRequested, RetryRequested, WorkflowSubmitted
from plait.coordinator.runtime import Runtime
from plait.coordinator.services.logs import follow_action_logs, recorded_attempts
from plait.errors import FieldViolation, InvalidArgumentError, NotFoundError
from plait.ids import describe_id
from plait.spec.validate import validate_submit
from plait.tracecontext import describe_traceparent
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
MAX_PAGE = 1000
OUTPUTS_CHUNK_BYTES = 1024 * 1024  # GetActionOutputs: bytes per response
_RESPONSE_MARGIN = 64 * 1024
# A spec of this many actions or bytes or more is validated in a thread (validate_submit is
# pure: it needs no scheduler state), so a big submit does not hold the event loop for seconds;
# smaller ones are validated in place, cheaper than the hop (about 14 us per action or 6 us per
# KiB of input JSON, against 0.1 ms a hop).
VALIDATE_OFF_LOOP_ACTIONS = 256
VALIDATE_OFF_LOOP_BYTES = 64 * 1024


_pauses = 0  # big submissions under way (on the event loop's thread: no lock needed)
_was_enabled = False  # whether the collector ran before the first of them


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic collector while a big submission is validated and built: it
    makes 100,000-odd records and no garbage, and each collection would rescan them all (a
    100,000-action submit spent over a second in it). Nested uses (two big submissions at
    once) resume it when the last ends, and only if it was on.

    On resuming, everything is moved to the oldest generation first (``gc.freeze()`` then
    ``gc.unfreeze()``: two list splices), so the records are not all walked by the very next
    young collection, on the reply's path; a full collection sees them in its own time.
    """
    global _pauses, _was_enabled
    if _pauses == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def merge_client_hlc(runtime: Runtime, msg: Any) -> None:
    """Merges a client's HLC stamp (a clock too far ahead is simply not merged)."""
    runtime.merge_hlc(msg)


def check_workflow_id(value: str) -> None:
    """INVALID_ARGUMENT naming ``workflow_id`` when it cannot be an id."""
    why = describe_id(value)
    if why:
        raise InvalidArgumentError([FieldViolation("workflow_id", why)])


def _page_start(token: str, count: int) -> int:
    """The first action index a GetWorkflow ``page_token`` names (INVALID_ARGUMENT if none)."""
    if not token:
        return 0
    if not (token.isascii() and token.isdigit() and len(token) <= 9 and 0 < int(token) < count):
        raise InvalidArgumentError(
            [FieldViolation("page_token", "is not a next_page_token of this workflow's pages")]
        )
    return int(token)


async def read_streamed_submit(
    requests: AsyncIterator[wspb.SubmitWorkflowStreamRequest], max_spec_bytes: int
) -> wspb.SubmitWorkflowRequest:
    """The submission a ``SubmitWorkflowStream`` carries: the first message's header with the
    spec parsed from every message's ``spec_chunk``, joined in order.

    Raises INVALID_ARGUMENT naming ``spec_chunk`` as soon as the pieces pass ``max_spec_bytes``
    (the rest is not read), or when they do not make a ``WorkflowSpec``; naming ``header`` when
    the stream has no message.
    """
    header: wspb.SubmitWorkflowRequest | None = None
    chunks: list[bytes] = []
    size = 0
    async for message in requests:
        if header is None:
            header = message.header
        size += len(message.spec_chunk)
        if size > max_spec_bytes:
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "spec_chunk",
                        f"the spec passes {size} bytes; the limit max_spec_bytes is"
                        f" {max_spec_bytes}",
                    )
                ]
            )
        if message.spec_chunk:
            chunks.append(message.spec_chunk)
    if header is None:
        raise InvalidArgumentError([FieldViolation("header", "the stream sent no message")])
    request = wspb.SubmitWorkflowRequest()
    request.CopyFrom(header)
    try:
        request.spec.ParseFromString(b"".join(chunks))
    except DecodeError as exc:
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "spec_chunk", f"{size} bytes that do not decode as a WorkflowSpec ({exc})"
                )
            ]
        ) from None
    return request


class WorkflowService(wsgrpc.WorkflowServiceServicer):
    """Submit, inspect, cancel and watch workflows."""

    def __init__(self, runtime: Runtime, limits: Limits) -> None:
        self.runtime = runtime
        self.limits = limits

    def _stamp(self, resp: Any) -> Any:
        self.runtime.stamp(resp.hlc)
        return resp

    async def SubmitWorkflow(
        self, request: wspb.SubmitWorkflowRequest, context: Any
    ) -> wspb.SubmitWorkflowResponse:
        workflow_id, created = await self._submit(request)
        return self._stamp(wspb.SubmitWorkflowResponse(workflow_id=workflow_id, created=created))  # type: ignore[no-any-return]

    async def SubmitWorkflowStream(
        self, requests: AsyncIterator[wspb.SubmitWorkflowStreamRequest], context: Any
    ) -> wspb.SubmitWorkflowStreamResponse:
        request = await read_streamed_submit(requests, self.limits.max_spec_bytes)
        workflow_id, created = await self._submit(request)
        return self._stamp(  # type: ignore[no-any-return]
            wspb.SubmitWorkflowStreamResponse(workflow_id=workflow_id, created=created)
        )

    async def _submit(self, request: wspb.SubmitWorkflowRequest) -> tuple[str, bool]:
        """Validates and journals one submission: ``(workflow_id, created)``."""
        merge_client_hlc(self.runtime, request.hlc)
        spec = request.spec
        if (
            len(spec.actions) >= VALIDATE_OFF_LOOP_ACTIONS
            or spec.ByteSize() >= VALIDATE_OFF_LOOP_BYTES
        ):
            # Nothing else touches this request meanwhile; what depends on the state (the
            # idempotency key) is decided by the core, on the loop. A big workflow's records
            # are garbage-free: the collector would only rescan them, again and again.
            with collector_paused():
                await asyncio.to_thread(validate_submit, spec, request.idempotency_key, self.limits)
                return await self._journal(request)
        validate_submit(spec, request.idempotency_key, self.limits)
        return await self._journal(request)

    async def _journal(self, request: wspb.SubmitWorkflowRequest) -> tuple[str, bool]:
        """Hands a validated submission to the core, which journals and builds it."""
        if request.traceparent:
            why = describe_traceparent(request.traceparent)
            if why:
                raise InvalidArgumentError([FieldViolation("traceparent", why)])
        rt = self.runtime
        workflow_id, created = await rt.call(
            lambda reply: WorkflowSubmitted(
                rt.next_id("submit"),
                f"wf-{uuid.uuid4().hex[:20]}",
                request.spec,
                request.idempotency_key,
                reply,
                traceparent=request.traceparent,
            )
        )
        return workflow_id, created

    def _workflow(self, workflow_id: str) -> Any:
        check_workflow_id(workflow_id)
        wf = self.runtime.state.workflows.get(workflow_id)
        if wf is None:
            raise NotFoundError(f"workflow {workflow_id!r} not found")
        return wf

    async def GetWorkflow(
        self, request: wspb.GetWorkflowRequest, context: Any
    ) -> wspb.GetWorkflowResponse:
        merge_client_hlc(self.runtime, request.hlc)
        st = self.runtime.state
        wf = self._workflow(request.workflow_id)
        count = len(wf.actions)
        start = _page_start(request.page_token, count)
        status, end = views.workflow_page(
            st, wf, start, request.page_size, self._budget, frozenset(request.states)
        )
        resp = wspb.GetWorkflowResponse(
            workflow=status, next_page_token=str(end) if end < count else ""
        )
        # The snapshot may include a batch still being committed: answer once it is durable.
        await self.runtime.durable(st.sequence)
        return self._stamp(resp)  # type: ignore[no-any-return]

    @property
    def _budget(self) -> int:
        """Bytes a response may take: the message limit (at most the clients' default, which
        they receive with), less room for what the interceptors and transport add."""
        return min(self.limits.max_message_bytes, MAX_MESSAGE_BYTES) - _RESPONSE_MARGIN

    async def GetActionOutputs(
        self, request: wspb.GetActionOutputsRequest, context: Any
    ) -> wspb.GetActionOutputsResponse:
        merge_client_hlc(self.runtime, request.hlc)
        wf = self._workflow(request.workflow_id)
        a = wf.actions.get(request.action_id)
        if a is None:
            raise NotFoundError(
                f"action {request.action_id[:256]!r} not found in workflow {request.workflow_id!r}"
            )
        total = a.outputs_bytes
        if request.offset > total:
            raise InvalidArgumentError(
                [FieldViolation("offset", f"is {request.offset}; the outputs are {total} bytes")]
            )
        st = self.runtime.state
        resp = wspb.GetActionOutputsResponse(
            outputs_bytes=total,
            offset=request.offset,
            chunk=st.outputs.read_range(a, request.offset, OUTPUTS_CHUNK_BYTES),
        )
        await self.runtime.durable(st.sequence)
        return self._stamp(resp)  # type: ignore[no-any-return]

    async def ListWorkflows(
        self, request: wspb.ListWorkflowsRequest, context: Any
    ) -> wspb.ListWorkflowsResponse:
        merge_client_hlc(self.runtime, request.hlc)
        if request.page_size > MAX_PAGE:
            raise InvalidArgumentError(
                [FieldViolation("page_size", f"is {request.page_size}; the limit is {MAX_PAGE}")]
            )
        size = request.page_size or 100
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise InvalidArgumentError([FieldViolation("page_token", "not a token")]) from None
        st = self.runtime.state
        wfs = list(reversed(st.workflows.values()))
        if request.state:
            wfs = [wf for wf in wfs if wf.state == request.state]
        page = wfs[start : start + size]
        resp = wspb.ListWorkflowsResponse(
            workflows=[views.workflow_status(st, wf, with_actions=False) for wf in page],
            next_page_token=str(start + size) if start + size < len(wfs) else "",
        )
        await self.runtime.durable(st.sequence)
        return self._stamp(resp)  # type: ignore[no-any-return]

    async def CancelWorkflow(
        self, request: wspb.CancelWorkflowRequest, context: Any
    ) -> wspb.CancelWorkflowResponse:
        merge_client_hlc(self.runtime, request.hlc)
        self._workflow(request.workflow_id)
        rt = self.runtime
        state = await rt.call(
            lambda reply: CancelRequested(
                rt.next_id("cancel"), request.workflow_id, request.reason[:1024], reply
            )
        )
        return self._stamp(wspb.CancelWorkflowResponse(state=state))  # type: ignore[no-any-return]

    async def RetryWorkflow(
        self, request: wspb.RetryWorkflowRequest, context: Any
    ) -> wspb.RetryWorkflowResponse:
        merge_client_hlc(self.runtime, request.hlc)
        self._workflow(request.workflow_id)
        rt = self.runtime
        ids = await rt.call(
            lambda reply: RetryRequested(rt.next_id("retry"), request.workflow_id, reply)
        )
        return self._stamp(wspb.RetryWorkflowResponse(action_ids=ids))  # type: ignore[no-any-return]

    async def WatchWorkflow(self, request: wspb.WatchWorkflowRequest, context: Any) -> Any:
        merge_client_hlc(self.runtime, request.hlc)
        self._workflow(request.workflow_id)
        # Headers at once: a client resuming after a restart knows it is being served before
        # the first event (which may be a long way off).
        await context.send_initial_metadata(())
        async for events in self.runtime.watch(
            request.workflow_id, request.after_sequence, request.follow
        ):
            resp = wspb.WatchWorkflowResponse()
            resp.events.extend(events)
            yield self._stamp(resp)

    async def GetActionLogs(
        self, request: wspb.GetActionLogsRequest, context: Any
    ) -> wspb.GetActionLogsResponse:
        merge_client_hlc(self.runtime, request.hlc)
        wf = self._workflow(request.workflow_id)
        if request.action_id not in wf.actions:
            raise NotFoundError(
                f"action {request.action_id!r} not found in workflow {request.workflow_id!r}"
            )
        attempts = await recorded_attempts(self.runtime, request.workflow_id, request.action_id)
        return self._stamp(wspb.GetActionLogsResponse(attempts=attempts))  # type: ignore[no-any-return]

    async def FollowActionLogs(
        self, request: wspb.FollowActionLogsRequest, context: Any
    ) -> AsyncIterator[wspb.FollowActionLogsResponse]:
        merge_client_hlc(self.runtime, request.hlc)
        async for resp in follow_action_logs(self.runtime, request):
            yield self._stamp(resp)
