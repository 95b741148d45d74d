r"""What the core observed and what it recorded, as metrics, traces and logs (edge layer).

The core returns :class:`~plait.coordinator.core.model.Observation`\ s with every outcome and
touches neither metrics nor logs itself; the runtime hands them here after the commit, with the
records the commit made. Log lines a worker can provoke at will (refused reports, refused
results, a clock far ahead, a refused hello, lost leases) are written at most once a minute per
worker and kind; every one is counted.

The gauges of the core's state are not fed here: :func:`state_gauges` computes them from the
core when /metrics is scraped (the runtime runs it on the event loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from plait.clock import Clock
from plait.coordinator.core import prefetch
from plait.coordinator.core import transitions as t
from plait.coordinator.core.model import RUNNING_WF, Observation
from plait.coordinator.core.state import STATE_NAME, SchedulerState
from plait.coordinator.forkjoin import ForkJoin
from plait.coordinator.metrics import CoordinatorMetrics, StateGauges, WorkerGauges
from plait.coordinator.services.errors import Throttle
from plait.coordinator.tracing import Tracing
from plait.spec.rules import fans_out
from plait.tracecontext import trace_id_for
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    pass


_EXEMPLARS_KEPT = 4096  # workflows whose exemplar labels are remembered
log = logging.getLogger("plait.coordinator.runtime")  # where these lines always were
E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
_ENDED = frozenset(
    {E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_ACTION_SKIPPED}
)
_LIVE_LABEL: dict[int, str] = {
    t.PENDING: "pending",
    t.READY: "ready",
    t.LEASED: "leased",
    t.RUNNING: "running",
}
_REFUSAL_WORDS = {
    "superseded": "its fencing token was superseded by a newer attempt",
    "cancelled": "the action was cancelled",
    "not_live": "the lease is no longer live",
    "unknown_lease": "no such lease",
}


class Observations:
    """Turns the core's observations and a commit's records into metrics, spans and
    (rate-limited) log lines."""

    def __init__(self, metrics: CoordinatorMetrics, tracing: Tracing, clock: Clock) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self.forkjoin = ForkJoin()
        self._log_once = Throttle(clock)  # refusals a worker can repeat at will
        self._exemplars: dict[str, dict[str, str]] = {}  # workflow -> its exemplar labels

    # ---- observations ------------------------------------------------------------------------

    def observe(self, observations: list[Observation], core: SchedulerState) -> None:
        """Counts and logs what the core observed (after the commit that followed it)."""
        m = self.metrics
        for o in observations:
            kind = o.kind
            if kind == "action_duration":
                m.action_duration.observe(
                    o.value, self._exemplar(core, o.lease_id.rsplit("/", 2)[0])
                )
            elif kind == "lease_lost":
                reason = _loss_reason(o.reason)
                m.leases_lost.labels(reason).inc()
                if o.reason == pb.EVENT_REASON_RECLAIMED:  # prefetch at work, not a fault
                    log.debug("lease %s handed back unstarted", o.lease_id)
                elif self._log_once.first((kind, o.worker_id, reason)):
                    log.warning(
                        "lease lost on worker %s: %s (more are counted, logged again in a minute)",
                        o.worker_id,
                        o.detail,
                        extra={"worker_id": o.worker_id},
                    )
            elif kind == "worker_connected":
                log.info("worker %s connected", o.worker_id, extra={"worker_id": o.worker_id})
                m.clock_offset_rejections.labels(o.worker_id)  # at 0: increase() sees the first
            elif kind == "worker_disconnected":
                log.info("worker %s disconnected", o.worker_id, extra={"worker_id": o.worker_id})
                if o.worker_id not in core.workers:
                    # Per-worker series live only while the worker does: a caller that makes up
                    # worker ids must not grow the label set without bound.
                    with contextlib.suppress(KeyError):
                        m.clock_offset_rejections.remove(o.worker_id)
            else:
                self._refused(o)

    def _refused(self, o: Observation) -> None:
        """Something a worker sent was refused: counted always, logged once a minute per
        worker and kind (a worker can repeat it at will)."""
        m = self.metrics
        kind = o.kind
        if kind == "stale_result":
            m.results_refused.labels(o.detail).inc()
            if self._log_once.first((kind, o.worker_id, o.detail)):
                log.warning(
                    "refused result from %s for lease %s: %s (more are counted, logged"
                    " again in a minute)",
                    o.worker_id,
                    o.lease_id,
                    _REFUSAL_WORDS.get(o.detail, o.detail),
                    extra=_lease_extra(o.worker_id, o.lease_id),
                )
        elif kind == "clock_offset":
            m.clock_offset_rejections.labels(o.worker_id).inc()
            if self._log_once.first((kind, o.worker_id)):
                log.warning(
                    "worker %s clock is %d ms ahead; its HLC was not merged (more are"
                    " counted, logged again in a minute)",
                    o.worker_id,
                    o.value,
                    extra={"worker_id": o.worker_id},
                )
        elif kind == "report_refused":
            m.reports_refused.labels(o.detail).inc()
            if o.detail == "result":
                m.results_refused.labels("not_held").inc()
            if self._log_once.first((kind, o.worker_id, o.detail)):
                log.warning(
                    "refused %s report from worker %s for lease %.200s: the session does not"
                    " hold it (more are counted, logged again in a minute)",
                    o.detail,
                    o.worker_id,
                    o.lease_id,
                    extra={"worker_id": o.worker_id, "lease_id": o.lease_id[:200]},
                )
        elif kind == "hello_refused":
            m.hellos_refused.inc()
            if self._log_once.first((kind, o.worker_id)):
                log.warning(
                    "refused hello from %s: worker id %s is connected and the new stream"
                    " did not prove to be it",
                    o.detail or "?",
                    o.worker_id,
                    extra={"worker_id": o.worker_id},
                )

    # ---- records -----------------------------------------------------------------------------

    def _exemplar(self, core: SchedulerState, workflow_id: str) -> dict[str, str] | None:
        """``{"trace_id": ...}`` of a workflow's trace (derived, so it exists with export off);
        remembered per workflow until it finishes (deriving costs a hash)."""
        found = self._exemplars.get(workflow_id)
        if found is not None:
            return found
        wf = core.workflows.get(workflow_id)
        if wf is None:
            return None
        trace_id = trace_id_for(workflow_id, wf.traceparent)
        found = self._exemplars[workflow_id] = {"trace_id": f"{trace_id:032x}"}
        if len(self._exemplars) > _EXEMPLARS_KEPT:  # (a finished workflow's last duration)
            del self._exemplars[next(iter(self._exemplars))]
        return found

    def observe_records(
        self, core: SchedulerState, records: list[pb.HistoryEvent], now: float
    ) -> None:
        """Counts what a commit recorded (leases, endings, retries, workflows, schedule-to-start,
        forks and joins) and hands the records to :meth:`Tracing.on_records` for the spans.

        ``core`` is the state right after the batch that made ``records``; ``now`` the
        monotonic time of the delivery (the same clock for every wait measured here).
        """
        m = self.metrics
        finished_by_state: dict[str, int] = {}
        granted = 0
        for ev in records:
            typ = ev.type
            if typ == E.EVENT_TYPE_ACTION_LEASED:
                granted += 1
            elif typ in _ENDED:
                state = STATE_NAME[ev.action_state]
                finished_by_state[state] = finished_by_state.get(state, 0) + 1
            elif typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
                state = pb.WorkflowState.Name(ev.workflow_state)
                m.workflows_finished.labels(state.removeprefix("WORKFLOW_STATE_").lower()).inc()
                self._exemplars.pop(ev.workflow_id, None)
            elif typ == E.EVENT_TYPE_ACTION_STARTED:
                self._started(core, ev, now)
            elif typ == E.EVENT_TYPE_ACTION_RETRY_SCHEDULED:
                m.retries.inc()
            elif typ == E.EVENT_TYPE_WORKFLOW_SUBMITTED:
                m.workflows_submitted.inc()
        if granted:
            m.leases_granted.inc(granted)
        for state, n in finished_by_state.items():
            m.actions_finished.labels(state.removeprefix("ACTION_STATE_").lower()).inc(n)
        self._fork_joins(core, records, now)

    def _fork_joins(self, core: SchedulerState, records: list[pb.HistoryEvent], now: float) -> None:
        """Fork widths and join waits and outcomes (computed once, for metrics and spans)."""
        m = self.metrics
        fork_joins = self.forkjoin.on_records(core, records, now)
        forks, joins = fork_joins
        for f in forks:
            m.fork_width.labels(f.kind).observe(f.width)
        for j in joins:
            m.joins.labels(j.kind, j.outcome).inc()
            m.join_wait.labels(j.kind).observe(
                max(0.0, j.wait_seconds), self._exemplar(core, j.workflow_id)
            )
        self.tracing.on_records(records, fork_joins)

    def _started(self, core: SchedulerState, ev: pb.HistoryEvent, now: float) -> None:
        """Schedule-to-start of one attempt: from when its action last became ready (the core's
        ``ActionRecord.ready_at``, after any backoff) to its start. A hedge, started beside a
        running attempt, waited for nothing and is not counted."""
        wf = core.workflows.get(ev.workflow_id)
        a = wf.actions.get(ev.action_id) if wf is not None else None
        if a is None or not a.ready_at:
            return
        lease = core.leases.get(ev.lease_id)
        if lease is not None and lease is a.hedge:
            return
        self.metrics.schedule_to_start.observe(
            max(0.0, now - a.ready_at), self._exemplar(core, ev.workflow_id)
        )


# ---- gauges of the core's state, computed at scrape time ------------------------------------


def state_gauges(core: SchedulerState, now: float, wall_ms: int) -> StateGauges:
    """The state gauges of ``core`` (``now``: monotonic seconds, ``wall_ms``: wall clock).

    Must run where the core is not being changed (on the event loop): it walks every live
    action once, which costs about a microsecond per action, only when /metrics is scraped.
    """
    g = StateGauges()
    actions = g.actions
    queue = g.queue_depth
    flight = g.items_in_flight
    for wf in core.workflows.values():
        if wf.state != RUNNING_WF:
            continue
        g.workflows_running += 1
        for a in wf.actions.values():
            label = _LIVE_LABEL.get(a.state)
            if label is None:
                continue
            actions[label] = actions.get(label, 0) + 1
            if label == "ready":
                cls = "exec" if a.spec.HasField("exec") else "handler"
                queue[cls] = queue.get(cls, 0) + 1
            elif a.parent is not None and label in ("leased", "running") and not fans_out(a.spec):
                kind = "pipeline" if a.parent.spec.HasField("pipeline") else "map"
                flight[kind] = flight.get(kind, 0) + 1
    for w in core.workers.values():
        offset: float | None = None
        if w.last_hlc.physical_ms:
            # Our wall clock when its last message arrived, against the stamp it carried.
            arrived_ms = wall_ms - (now - w.last_seen) * 1000.0
            offset = (w.last_hlc.physical_ms - arrived_ms) / 1000.0
        g.workers[w.worker_id] = WorkerGauges(
            heartbeat_age=max(0.0, now - w.last_renewed),
            clock_offset=offset,
            slots=w.slots,
            slots_used=max(0, w.slots - max(0, w.free)),
            prefetched=prefetch.queued(w),
            prefetch_depth=w.depth,
        )
    return g


# ---- helpers --------------------------------------------------------------------------------


def _lease_extra(worker_id: str, lease_id: str) -> dict[str, str]:
    """Log context of a lease: its worker, lease, workflow and action ids."""
    extra = {"worker_id": worker_id, "lease_id": lease_id}
    parts = lease_id.rsplit("/", 2)
    if len(parts) == 3:
        extra["workflow_id"], extra["action_id"] = parts[0], parts[1]
    return extra


def _loss_reason(reason: int) -> str:
    """The ``reason`` label of plait_leases_lost_total: the typed EventReason, lower case."""
    label = _LOSS_LABELS.get(reason)
    if label is None:
        known = reason in _REASONS
        name = pb.EventReason.Name(reason) if known else "EVENT_REASON_OTHER"  # type: ignore[arg-type]
        label = _LOSS_LABELS[reason] = name.removeprefix("EVENT_REASON_").lower()
    return label


_REASONS = frozenset(pb.EventReason.values())
_LOSS_LABELS: dict[int, str] = {}


T = TypeVar("T")


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` run on ``loop`` (between two of its callbacks) for a caller on another thread,
    waiting at most ``timeout`` seconds (TimeoutError); run at once when called on the loop.
    RuntimeError: the loop is closed."""
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        return fn()
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except Exception as e:  # raised again in the caller's thread
            fut.set_exception(e)

    loop.call_soon_threadsafe(run)
    try:
        return fut.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        fut.cancel()
        raise
