"""OpenTelemetry spans of the coordinator, and every span name and attribute key (edge layer).

A span per workflow, and a child span per action attempt whose W3C ``traceparent`` travels in
the lease so the worker continues it. The exporter is chosen by the standard environment
variable ``OTEL_TRACES_EXPORTER`` (``console``, ``otlp`` when its package is installed, or
``none``, the default); without one, spans are still made so trace ids reach workers and logs.
"""

from __future__ import annotations

import logging
import os
import random

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from plait.coordinator.core.transitions import STATE_NAME
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

log = logging.getLogger(__name__)

SPAN_WORKFLOW = "plait.workflow"
SPAN_ATTEMPT = "plait.action.attempt"
ATTR_WORKFLOW_ID = "plait.workflow.id"
ATTR_WORKFLOW_NAME = "plait.workflow.name"
ATTR_ACTION_ID = "plait.action.id"
ATTR_ATTEMPT = "plait.action.attempt"
ATTR_FENCING_TOKEN = "plait.lease.fencing_token"
ATTR_WORKER_ID = "plait.worker.id"
ATTR_STATE = "plait.state"
ATTR_CAUSE = "plait.cause"  # the stimulus that ended the span ("action_finished-w1-17")
ATTR_REASON = "plait.reason"  # the ending's typed EventReason, when it has one


def _exporter() -> SpanExporter | None:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed"
            )
            return None
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    log.warning("unknown OTEL_TRACES_EXPORTER %r; traces are not exported", name)
    return None


class Tracing:
    """Starts and ends the coordinator's spans; keeps open spans by workflow and lease.

    With no exporter configured, no SDK spans are made (they would cost ~20 us per attempt for
    nothing): attempts still get a fresh W3C traceparent, under their workflow's trace id, so
    workers and logs can correlate.
    """

    def __init__(self, service_name: str = "plait-coordinator") -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = _exporter()
        self.enabled = exporter is not None
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("plait.coordinator")
        self._trace_ids: dict[str, int] = {}
        self._rng = random.Random()
        self._workflows: dict[str, Span] = {}
        self._attempts: dict[str, Span] = {}

    def workflow_submitted(self, workflow_id: str, name: str) -> None:
        if not self.enabled:
            self._trace_ids[workflow_id] = self._rng.getrandbits(128) or 1
            return
        span = self.tracer.start_span(
            SPAN_WORKFLOW, attributes={ATTR_WORKFLOW_ID: workflow_id, ATTR_WORKFLOW_NAME: name}
        )
        self._workflows[workflow_id] = span  # type: ignore[assignment]

    def attempt_leased(
        self,
        workflow_id: str,
        action_id: str,
        attempt: int,
        token: int,
        worker_id: str,
        lease_id: str,
    ) -> str:
        """Starts the attempt's span and returns its W3C traceparent."""
        if not self.enabled:
            trace_id = self._trace_ids.get(workflow_id) or self._rng.getrandbits(128) or 1
            return f"00-{trace_id:032x}-{self._rng.getrandbits(64) or 1:016x}-01"
        parent = self._workflows.get(workflow_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(
            SPAN_ATTEMPT,
            context=ctx,
            attributes={
                ATTR_WORKFLOW_ID: workflow_id,
                ATTR_ACTION_ID: action_id,
                ATTR_ATTEMPT: attempt,
                ATTR_FENCING_TOKEN: token,
                ATTR_WORKER_ID: worker_id,
            },
        )
        self._attempts[lease_id] = span  # type: ignore[assignment]
        sc = span.get_span_context()
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def attempt_ended(self, lease_id: str, state: str, cause: str = "", reason: str = "") -> None:
        span = self._attempts.pop(lease_id, None)
        if span is not None:
            span.set_attribute(ATTR_STATE, state)
            if cause:
                span.set_attribute(ATTR_CAUSE, cause)
            if reason:
                span.set_attribute(ATTR_REASON, reason)
            span.end()

    def workflow_finished(self, workflow_id: str, state: str) -> None:
        self._trace_ids.pop(workflow_id, None)
        span = self._workflows.pop(workflow_id, None)
        if span is not None:
            span.set_attribute(ATTR_STATE, state)
            span.end()

    def trace_id(self, lease_id: str) -> str | None:
        """The trace id of an open attempt span (for exemplars), if any."""
        span = self._attempts.get(lease_id)
        return f"{span.get_span_context().trace_id:032x}" if span is not None else None

    def shutdown(self) -> None:
        for span in [*self._attempts.values(), *self._workflows.values()]:
            span.end()
        self._attempts.clear()
        self._workflows.clear()
        self.provider.shutdown()

    # ---- what a commit recorded ----------------------------------------------------------

    def on_grant(self, grant: wpb.LeaseGrant, worker_id: str) -> None:
        """Opens each granted attempt's span and gives its lease the span's trace context."""
        for lease in grant.leases:
            lease.traceparent = self.attempt_leased(
                lease.workflow_id,
                lease.action_id,
                lease.attempt,
                lease.fencing_token,
                worker_id,
                lease.lease_id,
            )

    def on_records(self, records: list[pb.HistoryEvent]) -> None:
        """Ends and opens spans by what a commit recorded (called after it, in order)."""
        for ev in records:
            typ = ev.type
            if typ in _ENDED:
                if ev.lease_id:
                    state = STATE_NAME[ev.action_state]
                    self.attempt_ended(ev.lease_id, state, ev.cause, _reason(ev.reason))
            elif typ == E.EVENT_TYPE_ACTION_RETRY_SCHEDULED:
                self.attempt_ended(ev.lease_id, "RETRY", ev.cause, _reason(ev.reason))
            elif typ == E.EVENT_TYPE_LEASE_LOST:
                lease_id = ev.lease_id or f"{ev.workflow_id}/{ev.action_id}/{ev.fencing_token}"
                self.attempt_ended(lease_id, "LEASE_LOST", ev.cause, _reason(ev.reason))
            elif typ == E.EVENT_TYPE_WORKFLOW_SUBMITTED:
                self.workflow_submitted(ev.workflow_id, ev.spec.name)
            elif typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
                self.workflow_finished(ev.workflow_id, pb.WorkflowState.Name(ev.workflow_state))


E = pb  # EVENT_TYPE_* constants
_ENDED = frozenset(
    {E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_ACTION_SKIPPED}
)


def _reason(reason: int) -> str:
    """An EventReason's name without its prefix ("" for none): a span attribute."""
    if not reason:
        return ""
    if reason not in pb.EventReason.values():
        return str(reason)
    return pb.EventReason.Name(reason).removeprefix("EVENT_REASON_")  # type: ignore[arg-type]
