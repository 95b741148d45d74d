"""``plait.Client``: submit, inspect and watch workflows over gRPC (SDK layer).

A thin, synchronous wrapper over ``WorkflowService`` and ``AdminService``. It keeps a hybrid
logical clock: every request carries the client's reading and every response's reading is
merged, so what a client does after seeing an event is ordered after that event. gRPC errors
come back as :mod:`plait.errors` exceptions; an unreachable coordinator is
:class:`plait.errors.UnavailableError`.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import grpc

from plait import hlc
from plait.clock import Clock, SystemClock
from plait.errors import PlaitError, UnavailableError, from_rpc_error
from plait.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

__all__ = [
    "DEFAULT_TARGET",
    "MAX_MESSAGE_BYTES",
    "TERMINAL_WORKFLOW_STATES",
    "Client",
    "channel_options",
    "parse_workflow_state",
    "resolve_target",
]

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:7450"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
TERMINAL_WORKFLOW_STATES = frozenset(
    {
        workflow_pb2.WORKFLOW_STATE_SUCCEEDED,
        workflow_pb2.WORKFLOW_STATE_FAILED,
        workflow_pb2.WORKFLOW_STATE_CANCELLED,
    }
)


class _ToSpec(Protocol):
    def to_spec(self) -> workflow_pb2.WorkflowSpec: ...


def resolve_target(target: str | None = None) -> str:
    """``target``, else ``$PLAIT_COORDINATOR``, else ``127.0.0.1:7450``."""
    return target or os.environ.get("PLAIT_COORDINATOR") or DEFAULT_TARGET


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel options every Plait client uses (4 MiB messages both ways, set explicitly)."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def parse_workflow_state(state: str | int | None) -> workflow_pb2.WorkflowState.ValueType:
    """``running``, ``RUNNING`` or ``WORKFLOW_STATE_RUNNING`` (or the enum value) to the enum.

    Raises:
        ValueError: not a workflow state; the message lists the valid ones.
    """
    if state is None or state == "":
        return workflow_pb2.WORKFLOW_STATE_UNSPECIFIED
    if isinstance(state, int):
        value = workflow_pb2.WorkflowState.ValueType(state)
        workflow_pb2.WorkflowState.Name(value)  # raises ValueError when unknown
        return value
    name = state.strip().upper()
    if not name.startswith("WORKFLOW_STATE_"):
        name = "WORKFLOW_STATE_" + name
    try:
        return workflow_pb2.WorkflowState.Value(name)
    except ValueError:
        valid = [
            n.removeprefix("WORKFLOW_STATE_").lower()
            for n, _ in workflow_pb2.WorkflowState.items()
            if not n.endswith("UNSPECIFIED")
        ]
        raise ValueError(
            f"unknown workflow state {state!r}; expected one of {', '.join(valid)}"
        ) from None


class Client:
    """A synchronous client of one coordinator.

    Args:
        target: ``host:port`` of the coordinator; defaults to ``$PLAIT_COORDINATOR``, then
            ``127.0.0.1:7450``.
        clock: time source of the client's HLC (tests inject a manual clock).
        timeout: deadline in seconds of each unary call (``None``: no deadline).
        token: bearer token sent with every call; defaults to ``$PLAIT_TOKEN``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = 30.0,
        token: str | None = None,
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self._clock: Clock = clock or SystemClock()
        self.hlc = hlc.HybridLogicalClock(self._clock)
        token = token if token is not None else os.environ.get("PLAIT_TOKEN", "")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel = grpc.insecure_channel(self.target, options=channel_options())
        self._workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)

    # -- plumbing -------------------------------------------------------------------------

    def _error(self, err: grpc.RpcError) -> PlaitError:
        out = from_rpc_error(err)
        if isinstance(out, UnavailableError):
            detail = out.message or "unavailable"
            return UnavailableError(f"coordinator at {self.target} is unreachable: {detail}")
        return out

    def _observe(self, stamp: Any) -> None:
        try:
            self.hlc.observe_proto(stamp)
        except hlc.ClockOffsetError as exc:
            # A coordinator clock far ahead of ours: keep ours, say so once per response.
            log.warning("not merging the coordinator's HLC: %s", exc)

    def _call(self, method: Any, request: Any) -> Any:
        self.hlc.stamp(request.hlc)
        try:
            response = method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None
        self._observe(response.hlc)
        return response

    # -- workflows ------------------------------------------------------------------------

    def submit(
        self,
        workflow: workflow_pb2.WorkflowSpec | _ToSpec | str | os.PathLike[str],
        idempotency_key: str | None = None,
    ) -> workflow_service_pb2.SubmitWorkflowResponse:
        """Submits a spec, a :class:`plait.Workflow`, or the path of a YAML workflow file.

        Returns the response: ``workflow_id`` and ``created`` (false when the idempotency key
        matched an existing workflow).
        """
        if isinstance(workflow, workflow_pb2.WorkflowSpec):
            spec = workflow
        elif isinstance(workflow, str | os.PathLike | Path):
            from plait.spec import load_workflow

            spec = load_workflow(workflow)
        else:
            spec = workflow.to_spec()
        request = workflow_service_pb2.SubmitWorkflowRequest(
            spec=spec, idempotency_key=idempotency_key or ""
        )
        response: workflow_service_pb2.SubmitWorkflowResponse = self._call(
            self._workflows.SubmitWorkflow, request
        )
        return response

    def get(self, workflow_id: str) -> workflow_pb2.WorkflowStatus:
        """The workflow's status with every action (``NotFoundError`` for an unknown id)."""
        request = workflow_service_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        response: workflow_service_pb2.GetWorkflowResponse = self._call(
            self._workflows.GetWorkflow, request
        )
        return response.workflow

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
                self._workflows.ListWorkflows, request
            )
            out.extend(page.workflows)
            token = page.next_page_token
            if not token:
                return out

    def cancel(self, workflow_id: str, reason: str = "") -> int:
        """Cancels a workflow; returns its ``WorkflowState`` after the request."""
        request = workflow_service_pb2.CancelWorkflowRequest(workflow_id=workflow_id, reason=reason)
        response: workflow_service_pb2.CancelWorkflowResponse = self._call(
            self._workflows.CancelWorkflow, request
        )
        return response.state

    def watch(
        self, workflow_id: str, after_sequence: int = 0, follow: bool = True
    ) -> Iterator[workflow_pb2.HistoryEvent]:
        """The workflow's history after ``after_sequence`` in HLC order, then (``follow``) live
        events until it finishes. Closing the iterator cancels the stream."""
        return self._watch(workflow_id, after_sequence, follow, None)

    def _watch(
        self, workflow_id: str, after_sequence: int, follow: bool, deadline: float | None
    ) -> Iterator[workflow_pb2.HistoryEvent]:
        request = workflow_service_pb2.WatchWorkflowRequest(
            workflow_id=workflow_id, after_sequence=after_sequence, follow=follow
        )
        self.hlc.stamp(request.hlc)
        call = self._workflows.WatchWorkflow(request, timeout=deadline, metadata=self._metadata)
        try:
            for response in call:
                self._observe(response.hlc)
                # The coordinator sends the events of one journal commit together.
                yield from response.events
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    def wait(self, workflow_id: str, timeout: float | None = None) -> workflow_pb2.WorkflowStatus:
        """Blocks until the workflow is terminal and returns its final status.

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
                for event in self._watch(workflow_id, last, True, remaining):
                    last = max(last, event.sequence)
                    if event.type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
                        finished = True
                        break
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
            self._workflows.GetActionLogs, request
        )
        return list(response.attempts)

    # -- workers --------------------------------------------------------------------------

    def workers(self) -> builtins.list[admin_service_pb2.WorkerInfo]:
        """The connected workers."""
        response: admin_service_pb2.ListWorkersResponse = self._call(
            self._admin.ListWorkers, admin_service_pb2.ListWorkersRequest()
        )
        return list(response.workers)

    def drain(self, worker_id: str) -> None:
        """Asks a worker to take no new work, finish what it holds and leave."""
        self._call(
            self._admin.DrainWorker, admin_service_pb2.DrainWorkerRequest(worker_id=worker_id)
        )

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (cancelling any open watch)."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
