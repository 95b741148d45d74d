"""OpenTelemetry spans of the coordinator, and every span name and attribute key (edge layer).

Spans are made from what each commit recorded (:meth:`Tracing.on_records`, after the commit,
in order) and the fork and join facts :class:`~plait.coordinator.forkjoin.ForkJoin` derived from
it; their times are the records' ``recorded_at``. The tree of one workflow run::

    plait.workflow                      (root, or a child of the submitter's traceparent)
    ├── plait.fork                      an action with several dependents, a map, a pipeline
    │   └── plait.action.attempt        one per lease of a branch (worker: plait.action.execute)
    ├── plait.action.attempt            one per lease of an action that is no fork's branch
    └── plait.join                      several needs, or a map/pipeline collecting its children;
                                        one link per need's committed attempt span

Ids are derived (:mod:`plait.tracecontext`): the trace id from the workflow id (or the
submitter's), each span id from the workflow run, action and lease, so a restarted or
failed-over coordinator continues the same trace under the same parents. The SDK is given
those ids through :class:`_DerivedIds`, set just before each ``start_span``.

Configuration is the SDK's standard environment: ``OTEL_TRACES_EXPORTER`` (``otlp``, whose
protocol ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` picks gRPC or
HTTP, ``console``, any installed exporter's name, or ``none``, the default),
``OTEL_EXPORTER_OTLP_*``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``. With no exporter, no SDK spans are made: leases still
get a traceparent with the derived ids, flagged not sampled (``00``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, Status, StatusCode
from opentelemetry.trace import TraceFlags as Flags
from opentelemetry.util.types import Attributes

from plait.coordinator.core import transitions as t
from plait.coordinator.core.state import SchedulerState
from plait.coordinator.forkjoin import Fork, Join, JoinOver
from plait.otel import span_exporters
from plait.tracecontext import format_traceparent, parse_traceparent, span_id_for, trace_id_for
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

log = logging.getLogger(__name__)

SPAN_WORKFLOW = "plait.workflow"
SPAN_FORK = "plait.fork"
SPAN_ATTEMPT = "plait.action.attempt"
SPAN_JOIN = "plait.join"
ATTR_WORKFLOW_ID = "plait.workflow.id"
ATTR_WORKFLOW_NAME = "plait.workflow.name"
ATTR_ACTION_ID = "plait.action.id"
ATTR_ATTEMPT = "plait.action.attempt"
ATTR_FENCING_TOKEN = "plait.lease.fencing_token"
ATTR_LEASE_ID = "plait.lease.id"
ATTR_WORKER_ID = "plait.worker.id"
ATTR_STATE = "plait.state"
ATTR_CAUSE = "plait.cause"  # the stimulus that ended the span ("action_finished-w1-17")
ATTR_REASON = "plait.reason"  # the ending's typed EventReason, when it has one
ATTR_ERROR_TYPE = "plait.error.type"  # the type a worker gave a failed attempt
ATTR_FORK_KIND = "plait.fork.kind"  # dependents | map | pipeline
ATTR_FORK_WIDTH = "plait.fork.width"
ATTR_JOIN_KIND = "plait.join.kind"  # all | any | at_least
ATTR_JOIN_OVER = "plait.join.over"  # needs | children
ATTR_JOIN_REQUIRED = "plait.join.required"  # M
ATTR_JOIN_OF = "plait.join.of"  # N
ATTR_JOIN_SUCCEEDED = "plait.join.succeeded"  # action ids
ATTR_JOIN_FAILED = "plait.join.failed"  # action ids that ended without success
ATTR_JOIN_OUTCOME = "plait.join.outcome"  # met | impossible
ATTR_JOIN_WAIT = "plait.join.wait_seconds"

STATE_RETRY = "RETRY"  # an attempt that failed and will be followed by another
STATE_LEASE_LOST = "LEASE_LOST"
STATE_BRANCHES_ENDED = "BRANCHES_ENDED"  # a dependents fork whose every branch ended
STATE_STOPPED = "COORDINATOR_STOPPED"  # open at shutdown; a successor continues the trace

E = pb  # EVENT_TYPE_* constants
_ENDED = frozenset(
    {E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_ACTION_SKIPPED}
)
_FAILED_STATES = frozenset({t.FAILED, t.TIMED_OUT})
_FAILED_WORKFLOW = frozenset({pb.WORKFLOW_STATE_FAILED})
_RECENT = 8192  # leases whose trace id is remembered for exemplars after their span ended

ForkJoins = tuple[Sequence[Fork], Sequence[Join]]


class _DerivedIds(IdGenerator):
    """Hands the SDK the ids set just before ``start_span`` (random only when none was)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        span_id, self.span_id = self.span_id, 0
        return span_id or self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id, self.trace_id = self.trace_id, 0
        return trace_id or self._random.generate_trace_id()


@dataclass(slots=True)
class _ForkSpan:
    context: SpanContext
    span: Span | None
    kind: str
    open: set[str]  # a dependents fork's branches not yet ended


@dataclass(slots=True)
class _Workflow:
    """What is known of one workflow run (enough to derive every id under it)."""

    workflow_id: str
    trace_id: int
    run: int  # sequence of its submission or last retry
    sampled: bool
    submitter: str = ""  # the submitter's traceparent, if it gave one
    name: str = ""
    span: Span | None = None
    forks: dict[str, _ForkSpan] = field(default_factory=dict)
    branch_of: dict[str, str] = field(default_factory=dict)  # action -> its fork's action
    joined: set[str] = field(default_factory=set)  # actions joining several needs
    collected: set[str] = field(default_factory=set)  # maps/pipelines (children joins)
    leases: set[str] = field(default_factory=set)  # its open attempt spans

    def context(self) -> SpanContext:
        flags = Flags(Flags.SAMPLED if self.sampled else Flags.DEFAULT)
        return SpanContext(
            self.trace_id, span_id_for("workflow", self.workflow_id, self.run), False, flags
        )


@dataclass(slots=True)
class _Attempt:
    span: Span
    workflow_id: str
    action_id: str


class Tracing:
    """Makes the coordinator's spans from what commits recorded; derives every id.

    ``processor``: where spans go instead of the exporters the environment names (tests give
    a ``SimpleSpanProcessor`` over an in-memory exporter); ``sampler``: instead of
    ``OTEL_TRACES_SAMPLER``'s.
    """

    def __init__(
        self,
        service_name: str = "plait-coordinator",
        processor: SpanProcessor | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        self._ids = _DerivedIds()
        self.provider = TracerProvider(
            resource=Resource.create(attrs), sampler=sampler, id_generator=self._ids
        )
        processors = [processor] if processor is not None else []
        if processor is None:
            processors = [BatchSpanProcessor(x) for x in span_exporters()]
        for p in processors:
            self.provider.add_span_processor(p)
        self.enabled = bool(processors)
        self.tracer = self.provider.get_tracer("plait.coordinator")
        self._workflows: dict[str, _Workflow] = {}
        self._attempts: dict[str, _Attempt] = {}
        self._by_action: dict[tuple[str, str], list[str]] = {}
        self._recent: OrderedDict[str, str] = OrderedDict()  # lease -> trace id (exemplars)
        # Finished workflows' (submitter's traceparent, name): a retried run stays in its trace.
        self._finished: OrderedDict[str, tuple[str, str]] = OrderedDict()

    # ---- what others ask --------------------------------------------------------------------

    def traceparent(self, workflow_id: str, lease_id: str) -> str:
        """The W3C traceparent a lease carries: its attempt span's context (derived ids),
        flagged sampled only when that span is recorded."""
        x = self._attempts.get(lease_id)
        if x is not None:
            sc = x.span.get_span_context()
            return format_traceparent(sc.trace_id, sc.span_id, sc.trace_flags.sampled)
        wf = self._workflows.get(workflow_id)
        trace_id = wf.trace_id if wf is not None else trace_id_for(workflow_id)
        return format_traceparent(trace_id, span_id_for("attempt", lease_id), 0)

    def trace_id(self, lease_id: str) -> str | None:
        """The trace id (32 hex) of an attempt whose span is (or was lately) recorded, for an
        exemplar; None when no trace of it is exported."""
        return self._recent.get(lease_id)

    def workflow_trace_id(self, workflow_id: str) -> str | None:
        """The trace id (32 hex) of a running workflow whose spans are recorded, or None."""
        wf = self._workflows.get(workflow_id)
        return f"{wf.trace_id:032x}" if wf is not None and wf.sampled and self.enabled else None

    # ---- lifecycle -------------------------------------------------------------------------

    def resume(self, core: SchedulerState) -> None:
        """Learns the running workflows of a core that was loaded from the journal (a restart,
        a failover, a rebuild), so that spans made from now on get the same trace ids and
        parents as the ones the previous coordinator made. Spans that were open there ended
        when it stopped; nothing is opened again here."""
        for wf in core.workflows.values():
            if wf.state != pb.WORKFLOW_STATE_RUNNING or wf.workflow_id in self._workflows:
                continue
            w = self._workflows[wf.workflow_id] = _Workflow(
                wf.workflow_id, trace_id_for(wf.workflow_id, wf.traceparent), wf.run_seq, True
            )
            for a in wf.actions.values():
                if len(a.needs) > 1 and a.parent is None:
                    w.joined.add(a.id)
                if a.children is not None:
                    w.collected.add(a.id)
                    kind = "pipeline" if a.spec.HasField("pipeline") else "map"
                    branches = [x.id for x in wf.actions.values() if x.parent is a]
                    self._register_fork(w, a.id, kind, branches, None)
                elif a.state == t.SUCCEEDED and len(a.dependents) > 1 and a.parent is None:
                    branches = [d.id for d in a.dependents]
                    self._register_fork(w, a.id, "dependents", branches, None)
                    w.forks[a.id].open = {d.id for d in a.dependents if d.state not in t.TERMINAL}

    def shutdown(self) -> None:
        """Ends every open span (``plait.state`` COORDINATOR_STOPPED) and flushes them."""
        for x in self._attempts.values():
            _end(x.span, STATE_STOPPED)
        for wf in self._workflows.values():
            for f in wf.forks.values():
                if f.span is not None:
                    _end(f.span, STATE_STOPPED)
            if wf.span is not None:
                _end(wf.span, STATE_STOPPED)
        self._attempts.clear()
        self._by_action.clear()
        self._workflows.clear()
        self.provider.shutdown()

    # ---- what a commit recorded ------------------------------------------------------------

    def on_grant(self, grant: wpb.LeaseGrant, worker_id: str) -> None:
        """Gives each granted lease its attempt span's traceparent (the span was opened from
        the ACTION_LEASED record of the same commit)."""
        for lease in grant.leases:
            lease.traceparent = self.traceparent(lease.workflow_id, lease.lease_id)

    def on_records(self, records: list[pb.HistoryEvent], fork_joins: ForkJoins = ((), ())) -> None:
        """Opens and ends spans by what a commit recorded (called after it, in order), and
        makes the fork and join spans of ``fork_joins`` (``ForkJoin.on_records``'s)."""
        forks = {(f.workflow_id, f.action_id): f for f in fork_joins[0]}
        joins = {(j.workflow_id, j.action_id, j.over): j for j in fork_joins[1]}
        for ev in records:
            typ = ev.type
            if typ in (E.EVENT_TYPE_WORKFLOW_SUBMITTED, E.EVENT_TYPE_WORKFLOW_RETRIED):
                self._open_workflow(ev)
            elif typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
                self._end_workflow(ev)
            elif typ == E.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED:
                wf = self._workflows.get(ev.workflow_id)
                if wf is not None and wf.span is not None:
                    wf.span.add_event("cancel requested", {ATTR_CAUSE: ev.cause}, _ns(ev))
            elif ev.action_id and self.enabled:
                self._on_action(ev, forks, joins)
        # Anything not placed at its record (it should not happen) is placed at the commit's end.
        last = records[-1] if records else pb.HistoryEvent()
        for f in forks.values():
            self._open_fork(f, last)
        for j in joins.values():
            self._join(j, last)

    def _on_action(
        self,
        ev: pb.HistoryEvent,
        forks: dict[tuple[str, str], Fork],
        joins: dict[tuple[str, str, JoinOver], Join],
    ) -> None:
        typ, wf_id, action_id = ev.type, ev.workflow_id, ev.action_id
        # A join resolved by this record comes first (its action's attempts are then the
        # workflow's), then what the record does, then a fork it makes (before its branches).
        j = joins.pop((wf_id, action_id, "needs"), None)
        if j is not None:
            self._join(j, ev)
        if typ == E.EVENT_TYPE_ACTION_LEASED:
            self._open_attempt(ev)
        elif typ == E.EVENT_TYPE_ACTION_STARTED:
            x = self._attempts.get(ev.lease_id)
            if x is not None:
                x.span.add_event("started", {ATTR_WORKER_ID: ev.worker_id}, _ns(ev))
        elif typ in _ENDED:
            state = ev.action_state
            error = _message(ev) if state in _FAILED_STATES else None
            self._end_attempts(ev, t.STATE_NAME[state], error, first=ev.lease_id)
            j = joins.pop((wf_id, action_id, "children"), None)
            if j is not None:
                self._join(j, ev)
            self._branch_ended(ev)
        elif typ == E.EVENT_TYPE_ACTION_RETRY_SCHEDULED:
            self._end_attempts(ev, STATE_RETRY, _message(ev))
        elif typ == E.EVENT_TYPE_LEASE_LOST:
            if ev.lease_id in self._attempts:
                self._end_lease(ev.lease_id, STATE_LEASE_LOST, ev, None)
            else:
                self._end_attempts(ev, STATE_LEASE_LOST, None)
        f = forks.pop((wf_id, action_id), None)
        if f is not None:
            self._open_fork(f, ev)

    # ---- workflow spans --------------------------------------------------------------------

    def _open_workflow(self, ev: pb.HistoryEvent) -> None:
        wf_id = ev.workflow_id
        if wf_id in self._workflows:  # a run this coordinator did not see end: it ends here
            self._end_workflow(ev, STATE_RETRY)
        if ev.type == E.EVENT_TYPE_WORKFLOW_SUBMITTED:
            submitter, name = ev.traceparent, ev.spec.name
        else:
            submitter, name = self._finished.pop(wf_id, ("", ""))
        trace_id = trace_id_for(wf_id, submitter)
        wf = _Workflow(wf_id, trace_id, ev.sequence, self.enabled, submitter, name)
        self._workflows[wf_id] = wf
        if not self.enabled:
            return
        parent = parse_traceparent(submitter) if submitter else None
        ctx: Context = Context()
        if parent is not None:
            remote = SpanContext(parent.trace_id, parent.span_id, True, Flags(parent.flags & 1))
            ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        attrs = {ATTR_WORKFLOW_ID: wf_id, ATTR_WORKFLOW_NAME: name, ATTR_CAUSE: ev.cause}
        span = self._start(SPAN_WORKFLOW, wf.context(), ctx, attrs, _ns(ev))
        wf.span = span
        wf.sampled = span.get_span_context().trace_flags.sampled

    def _end_workflow(self, ev: pb.HistoryEvent, state: str = "") -> None:
        wf = self._workflows.pop(ev.workflow_id, None)
        if wf is None:
            return
        if wf.submitter or wf.name:
            self._finished[wf.workflow_id] = (wf.submitter, wf.name)
            while len(self._finished) > _RECENT:
                self._finished.popitem(last=False)
        state = state or pb.WorkflowState.Name(ev.workflow_state)
        for lease_id in list(wf.leases):
            self._end_lease(lease_id, state, ev, None)
        for f in wf.forks.values():
            if f.span is not None:
                _end(f.span, state, ev)
        if wf.span is not None:
            failed = ev.workflow_state in _FAILED_WORKFLOW
            _end(wf.span, state, ev, (ev.message or state) if failed else None)

    # ---- attempts --------------------------------------------------------------------------

    def _open_attempt(self, ev: pb.HistoryEvent) -> None:
        wf = self._workflow(ev.workflow_id)
        fork_id = wf.branch_of.get(ev.action_id)
        fork = wf.forks.get(fork_id) if fork_id and ev.action_id not in wf.joined else None
        parent = fork.context if fork is not None else wf.context()
        own = SpanContext(wf.trace_id, span_id_for("attempt", ev.lease_id), False)
        attrs: Attributes = {
            ATTR_WORKFLOW_ID: ev.workflow_id,
            ATTR_ACTION_ID: ev.action_id,
            ATTR_ATTEMPT: ev.attempt,
            ATTR_FENCING_TOKEN: ev.fencing_token,
            ATTR_LEASE_ID: ev.lease_id,
            ATTR_WORKER_ID: ev.worker_id,
        }
        span = self._start(SPAN_ATTEMPT, own, _in(parent), attrs, _ns(ev))
        self._attempts[ev.lease_id] = _Attempt(span, ev.workflow_id, ev.action_id)
        self._by_action.setdefault((ev.workflow_id, ev.action_id), []).append(ev.lease_id)
        wf.leases.add(ev.lease_id)
        if span.get_span_context().trace_flags.sampled:
            self._recent[ev.lease_id] = f"{wf.trace_id:032x}"
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)

    def _end_attempts(
        self, ev: pb.HistoryEvent, state: str, error: str | None, first: str = ""
    ) -> None:
        """Ends every open attempt of the event's action: ``first`` (the lease the event
        names) with ``state``; the others (a hedge that lost) as cancelled."""
        for lease_id in list(self._by_action.get((ev.workflow_id, ev.action_id), ())):
            if not first or lease_id == first:
                self._end_lease(lease_id, state, ev, error)
            else:
                self._end_lease(lease_id, t.STATE_NAME[t.CANCELLED], ev, None)

    def _end_lease(self, lease_id: str, state: str, ev: pb.HistoryEvent, error: str | None) -> None:
        x = self._attempts.pop(lease_id, None)
        if x is None:
            return
        key = (x.workflow_id, x.action_id)
        leases = self._by_action.get(key, [])
        if lease_id in leases:
            leases.remove(lease_id)
        if not leases:
            self._by_action.pop(key, None)
        wf = self._workflows.get(x.workflow_id)
        if wf is not None:
            wf.leases.discard(lease_id)
        if ev.error_type:
            x.span.set_attribute(ATTR_ERROR_TYPE, ev.error_type)
        _end(x.span, state, ev, error)

    # ---- forks and joins -------------------------------------------------------------------

    def _register_fork(
        self, wf: _Workflow, action_id: str, kind: str, branches: Iterable[str], span: Span | None
    ) -> _ForkSpan:
        context = SpanContext(
            wf.trace_id,
            span_id_for("fork", wf.workflow_id, action_id, wf.run),
            False,
            Flags(Flags.SAMPLED if wf.sampled else Flags.DEFAULT),
        )
        branches = list(branches)
        f = wf.forks[action_id] = _ForkSpan(context, span, kind, set(branches))
        for b in branches:
            wf.branch_of[b] = action_id
        if kind != "dependents":
            wf.collected.add(action_id)
        return f

    def _open_fork(self, fork: Fork, ev: pb.HistoryEvent) -> None:
        wf = self._workflow(fork.workflow_id)
        f = self._register_fork(wf, fork.action_id, fork.kind, fork.branches, None)
        attrs: Attributes = {
            ATTR_WORKFLOW_ID: fork.workflow_id,
            ATTR_ACTION_ID: fork.action_id,
            ATTR_FORK_KIND: fork.kind,
            ATTR_FORK_WIDTH: fork.width,
        }
        f.span = self._start(SPAN_FORK, f.context, _in(wf.context()), attrs, _ns(ev))
        if fork.kind == "dependents" and not fork.branches:
            _end(f.span, STATE_BRANCHES_ENDED, ev)
            f.span = None

    def _branch_ended(self, ev: pb.HistoryEvent) -> None:
        """An action ended: a map or pipeline's fork ends with it; a dependents fork ends with
        its last branch."""
        wf = self._workflows.get(ev.workflow_id)
        if wf is None:
            return
        own = wf.forks.get(ev.action_id)
        if own is not None and own.kind != "dependents" and own.span is not None:
            _end(own.span, t.STATE_NAME[ev.action_state], ev)
            own.span = None
        fork_id = wf.branch_of.get(ev.action_id)
        f = wf.forks.get(fork_id) if fork_id else None
        if f is not None and f.kind == "dependents":
            f.open.discard(ev.action_id)
            if not f.open and f.span is not None:
                _end(f.span, STATE_BRANCHES_ENDED, ev)
                f.span = None

    def _join(self, j: Join, ev: pb.HistoryEvent) -> None:
        wf = self._workflows.get(j.workflow_id)
        if wf is None or not self.enabled:
            return
        if j.over == "needs":
            wf.joined.add(j.action_id)
        links = []
        for need_id, state, lease_id in j.needs:
            if lease_id:
                span_id = span_id_for("attempt", lease_id)
            elif need_id in wf.collected:  # a map or pipeline: its children's join
                span_id = span_id_for("join", j.workflow_id, need_id, "children", wf.run)
            else:
                continue  # never attempted, or still open: no span to point at
            sc = SpanContext(wf.trace_id, span_id, False, Flags(Flags.SAMPLED))
            links.append(Link(sc, {ATTR_ACTION_ID: need_id, ATTR_STATE: state}))
        own = SpanContext(
            wf.trace_id, span_id_for("join", j.workflow_id, j.action_id, j.over, wf.run), False
        )
        end = _ns(ev)
        start = j.first_ended_ns or (end - int(j.wait_seconds * 1e9) if end is not None else None)
        attrs: Attributes = {
            ATTR_WORKFLOW_ID: j.workflow_id,
            ATTR_ACTION_ID: j.action_id,
            ATTR_JOIN_KIND: j.kind,
            ATTR_JOIN_OVER: j.over,
            ATTR_JOIN_REQUIRED: j.required,
            ATTR_JOIN_OF: j.of,
            ATTR_JOIN_SUCCEEDED: list(j.succeeded),
            ATTR_JOIN_FAILED: list(j.failed),
            ATTR_JOIN_OUTCOME: j.outcome,
            ATTR_JOIN_WAIT: j.wait_seconds,
        }
        span = self._start(SPAN_JOIN, own, _in(wf.context()), attrs, start, links)
        _end(span, t.STATE_NAME[ev.action_state], ev)

    # ---- helpers ---------------------------------------------------------------------------

    def _workflow(self, workflow_id: str) -> _Workflow:
        """The workflow's run; one this coordinator did not see start (before :meth:`resume`
        or without it) gets ids derived from its id alone."""
        wf = self._workflows.get(workflow_id)
        if wf is None:
            wf = _Workflow(workflow_id, trace_id_for(workflow_id), 0, self.enabled)
            self._workflows[workflow_id] = wf
        return wf

    def _start(
        self,
        name: str,
        own: SpanContext,
        parent: Context,
        attributes: Attributes,
        start_ns: int | None,
        links: Sequence[Link] = (),
    ) -> Span:
        self._ids.trace_id, self._ids.span_id = own.trace_id, own.span_id
        return self.tracer.start_span(
            name, context=parent, attributes=attributes, links=links, start_time=start_ns
        )


def _in(parent: SpanContext) -> Context:
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def _ns(ev: pb.HistoryEvent) -> int | None:
    """When the event was recorded (ns since the epoch): the spans' times."""
    return ev.recorded_at.ToNanoseconds() if ev.HasField("recorded_at") else None


def _message(ev: pb.HistoryEvent) -> str:
    return ev.error.message or ev.message or t.STATE_NAME[ev.action_state]


def _end(
    span: Span, state: str, ev: pb.HistoryEvent | None = None, error: str | None = None
) -> None:
    span.set_attribute(ATTR_STATE, state)
    if ev is not None:
        if ev.cause:
            span.set_attribute(ATTR_CAUSE, ev.cause)
        reason = _reason(ev.reason)
        if reason:
            span.set_attribute(ATTR_REASON, reason)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_ns(ev) if ev is not None else None)


def _reason(reason: int) -> str:
    """An EventReason's name without its prefix ("" for none): a span attribute."""
    if not reason:
        return ""
    if reason not in _REASONS:
        return str(reason)
    return pb.EventReason.Name(reason).removeprefix("EVENT_REASON_")  # type: ignore[arg-type]


_REASONS = frozenset(pb.EventReason.values())
