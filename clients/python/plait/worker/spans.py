"""Execute spans: the worker's continuation of an attempt's trace (foundation layer: plait.worker).

Every attempt a worker runs opens a ``plait.action.execute`` span, a child of the attempt span
whose W3C ``traceparent`` the coordinator put in the lease. Handlers run inside that span's
context (so a handler's own spans nest under it) and exec actions get ``TRACEPARENT`` naming it.
The span ends with the attempt, with ``plait.state`` and, for a failure or a timeout, status
ERROR with the message.

Spans are exported as the standard ``OTEL_*`` environment says (``OTEL_TRACES_EXPORTER``
``otlp``/``console``/``none``, ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_*``). With no
exporter no SDK span is made at all (the cheap path): exec actions get the lease's own
``traceparent`` and, when a tracer provider is installed globally, handlers run inside the
lease's context, so whatever they trace themselves still lands under the attempt span. With
neither, nothing OpenTelemetry is made per attempt: the trace and span ids for log lines and
exemplars are sliced from the ``traceparent`` text. A lease whose traceparent is not sampled
(flags ``00``) yields a non-recording span: nothing is exported for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from plait.otel import span_exporters
from plait.tracecontext import (
    SPAN_EXECUTE,
    TraceParent,
    describe_traceparent,
    format_traceparent,
    parse_traceparent,
)
from plait.v1 import worker_service_pb2 as pb

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "ATTR_ACTION_ID",
    "ATTR_ATTEMPT",
    "ATTR_EXIT_CODE",
    "ATTR_FENCING_TOKEN",
    "ATTR_STATE",
    "ATTR_WORKER_ID",
    "ATTR_WORKFLOW_ID",
    "SPAN_EXECUTE",
    "ExecuteSpan",
    "ExecuteTracing",
    "attached",
    "outcome_name",
]

log = logging.getLogger(__name__)

# Attribute keys; the coordinator's (plait.coordinator.tracing) use the same keys.
ATTR_WORKFLOW_ID = "plait.workflow.id"
ATTR_ACTION_ID = "plait.action.id"
ATTR_ATTEMPT = "plait.action.attempt"
ATTR_FENCING_TOKEN = "plait.lease.fencing_token"
ATTR_WORKER_ID = "plait.worker.id"
ATTR_STATE = "plait.state"
ATTR_LEASE_ID = "plait.lease.id"
ATTR_KIND = "plait.action.kind"  # exec | handler
ATTR_EXIT_CODE = "process.exit.code"  # OpenTelemetry semantic convention (exec only)

_OUTCOME_NAMES = {
    pb.ACTION_OUTCOME_SUCCEEDED: "succeeded",
    pb.ACTION_OUTCOME_FAILED: "failed",
    pb.ACTION_OUTCOME_CANCELLED: "cancelled",
    pb.ACTION_OUTCOME_TIMED_OUT: "timed_out",
}


def outcome_name(outcome: int) -> str:
    """``succeeded``, ``failed``, ``cancelled`` or ``timed_out`` (``unknown`` otherwise)."""
    return _OUTCOME_NAMES.get(outcome, "unknown")  # type: ignore[call-overload, no-any-return]


@dataclass(slots=True)
class ExecuteSpan:
    """One attempt's execute span (or, on the cheap path, the lease's own context)."""

    span: Span | None
    """The SDK span; ``None`` on the cheap path (no exporter)."""
    context: otel_context.Context | None
    """Handlers run attached to this context; ``None`` when the lease has no trace, or on the
    cheap path when no tracer provider is installed globally (nothing could record a span)."""
    traceparent: str
    """``TRACEPARENT`` for an exec action: the execute span's, else the lease's."""
    tracestate: str = ""
    """``TRACESTATE`` for an exec action (W3C), empty when there is none."""
    trace_id: str = ""
    """32 hex digits, or empty; for exemplars and logs."""
    span_id: str = ""
    """16 hex digits of the span ``traceparent`` names, or empty."""
    ended: bool = False

    def end(self, outcome: int, message: str = "", exit_code: int | None = None) -> None:
        """Ends the span (once) with ``plait.state``; ERROR with ``message`` unless succeeded."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        if span is None or not span.is_recording():
            if span is not None:
                span.end()
            return
        span.set_attribute(ATTR_STATE, outcome_name(outcome))
        if exit_code is not None:
            span.set_attribute(ATTR_EXIT_CODE, exit_code)
        if outcome in (pb.ACTION_OUTCOME_FAILED, pb.ACTION_OUTCOME_TIMED_OUT):
            span.set_status(Status(StatusCode.ERROR, message or outcome_name(outcome)))
        span.end()


class ExecuteTracing:
    """Opens execute spans for a worker; ``provider`` ``None`` is the cheap path."""

    def __init__(self, provider: Any = None, *, owned: bool = False) -> None:
        self.provider = provider
        self.owned = owned
        """Whether this object made the provider (and so shuts it down)."""
        self._tracer = provider.get_tracer("plait.worker") if provider is not None else None

    @property
    def enabled(self) -> bool:
        """Whether SDK spans are made."""
        return self._tracer is not None

    @classmethod
    def from_env(
        cls,
        default_service: str,
        *,
        environ: Mapping[str, str] | None = None,
        set_global: bool = False,
    ) -> ExecuteTracing:
        """Tracing as the ``OTEL_*`` environment configures it.

        ``default_service`` names the service unless ``OTEL_SERVICE_NAME`` does. With
        ``set_global`` the provider also becomes OpenTelemetry's global one (workerd: so
        handlers' own spans are exported alongside); an SDK provider set globally already (by
        the program embedding a :class:`plait.Worker`) is used as it is.
        """
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider

        current = trace.get_tracer_provider()
        if isinstance(current, SdkProvider):
            return cls(current)
        exporters = span_exporters(environ)
        if not exporters:
            return cls(None)
        provider = make_provider(exporters, default_service, environ=environ)
        if set_global:
            trace.set_tracer_provider(provider)
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Flushes and stops the exporters of a provider this object made (at exit)."""
        if not self.owned:
            return
        shutdown = getattr(self.provider, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def start(self, lease: pb.Lease, worker_id: str) -> ExecuteSpan:
        """Opens the execute span of ``lease``'s attempt (see the module docstring)."""
        tp = lease.traceparent
        if self._tracer is None:
            return _cheap_span(tp)
        parsed = parse_traceparent(tp) if tp else None
        parent_ctx = None if parsed is None else _remote_context(parsed)
        kind = lease.action.WhichOneof("kind") or ""
        span = self._tracer.start_span(
            SPAN_EXECUTE,
            context=parent_ctx,
            kind=SpanKind.CONSUMER,
            attributes={
                ATTR_WORKFLOW_ID: lease.workflow_id,
                ATTR_ACTION_ID: lease.action_id,
                ATTR_ATTEMPT: lease.attempt,
                ATTR_FENCING_TOKEN: lease.fencing_token,
                ATTR_WORKER_ID: worker_id,
                ATTR_LEASE_ID: lease.lease_id,
                ATTR_KIND: kind,
            },
        )
        sc = span.get_span_context()
        state = sc.trace_state.to_header() if sc.trace_state else ""
        return ExecuteSpan(
            span,
            trace.set_span_in_context(span),
            format_traceparent(sc.trace_id, sc.span_id, int(sc.trace_flags)),
            tracestate=state,
            trace_id=f"{sc.trace_id:032x}",
            span_id=f"{sc.span_id:016x}",
        )


_NO_TRACE = ExecuteSpan(None, None, "", ended=True)
"""The cheap path's span of a lease without a (valid) traceparent: nothing to end or attach."""


def _cheap_span(tp: str) -> ExecuteSpan:
    """No SDK span: the lease's own trace context, by slicing its ``traceparent``.

    Handlers need the OpenTelemetry context only when a tracer provider is installed globally
    (their own spans then nest under the attempt span); without one no context object is made,
    and log lines and exemplars take the ids from the ``traceparent`` text.
    """
    if not tp or describe_traceparent(tp) is not None:
        return _NO_TRACE
    ctx = _remote_context(parse_traceparent(tp)) if _provider_installed() else None
    # 00-<trace id: chars 3..35>-<span id: chars 36..52>-<flags>
    return ExecuteSpan(None, ctx, tp, trace_id=tp[3:35], span_id=tp[36:52])


def _provider_installed() -> bool:
    """Whether a tracer provider is set globally (so a handler's own spans may be recorded).

    Reads the API's global directly: ``trace.get_tracer_provider()`` looks
    ``OTEL_PYTHON_TRACER_PROVIDER`` up in the environment on every call until one is set.
    """
    if _HAS_GLOBAL_SLOT:
        return trace._TRACER_PROVIDER is not None
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)


_HAS_GLOBAL_SLOT = hasattr(trace, "_TRACER_PROVIDER")


def _remote_context(parsed: TraceParent | None) -> otel_context.Context | None:
    """A context whose current span is the (remote) span ``parsed`` names."""
    if parsed is None:
        return None
    remote = SpanContext(
        parsed.trace_id, parsed.span_id, is_remote=True, trace_flags=TraceFlags(parsed.flags)
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


def make_provider(
    exporters: SpanExporter | list[SpanExporter],
    default_service: str,
    *,
    environ: Mapping[str, str] | None = None,
    batch: bool = True,
) -> TracerProvider:
    """An SDK provider exporting to ``exporters``; ``OTEL_SERVICE_NAME`` overrides the name."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    env = os.environ if environ is None else environ
    service = env.get("OTEL_SERVICE_NAME", "").strip() or default_service
    provider = SdkProvider(resource=Resource.create({"service.name": service}))
    for exporter in exporters if isinstance(exporters, list) else [exporters]:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    return provider


class _Attached:
    """Attaches an OpenTelemetry context for a ``with`` block (a class: no generator per use)."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: otel_context.Context) -> None:
        self._ctx = ctx
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._ctx)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


_NOT_ATTACHED = nullcontext()


def attached(ctx: otel_context.Context | None) -> AbstractContextManager[None]:
    """Runs the block inside ``ctx`` (nothing when ``None``); works in any thread."""
    return _NOT_ATTACHED if ctx is None else _Attached(ctx)
