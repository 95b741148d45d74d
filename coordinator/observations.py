r"""What the core observed and what it recorded, as metrics, traces and logs (edge layer).

The core returns :class:`~plait.coordinator.core.model.Observation`\ s with every outcome and
touches neither metrics nor logs itself; the runtime hands them here after the commit. Log lines
a worker can provoke at will (refused reports, stale results, a clock far ahead, a refused
hello) are written at most once a minute per worker and kind; every one is counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Container

from plait.clock import Clock
from plait.coordinator.core.model import Observation
from plait.coordinator.core.state import STATE_NAME
from plait.coordinator.metrics import CoordinatorMetrics
from plait.coordinator.services.errors import Throttle
from plait.coordinator.tracing import Tracing
from plait.v1 import workflow_pb2 as pb

log = logging.getLogger("plait.coordinator.runtime")  # where these lines always were
E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
_ENDED = frozenset(
    {E.EVENT_TYPE_ACTION_FINISHED, E.EVENT_TYPE_ACTION_CANCELLED, E.EVENT_TYPE_ACTION_SKIPPED}
)


class Observations:
    """Turns the core's observations into metrics and (rate-limited) log lines."""

    def __init__(self, metrics: CoordinatorMetrics, tracing: Tracing, clock: Clock) -> None:
        self.metrics = metrics
        self.tracing = tracing
        self._log_once = Throttle(clock)  # refusals a worker can repeat at will

    def observe(self, observations: list[Observation], workers: Container[str]) -> None:
        """Counts and logs what the core observed; ``workers``: the worker ids still known."""
        m = self.metrics
        for o in observations:
            kind = o.kind
            if kind == "action_duration":
                trace_id = self.tracing.trace_id(o.lease_id)
                m.action_duration.observe(o.value, {"trace_id": trace_id} if trace_id else None)
            elif kind == "lease_lost":
                m.leases_lost.labels(_loss_reason(o.reason)).inc()
                log.warning(
                    "lease lost on worker %s: %s",
                    o.worker_id,
                    o.detail,
                    extra={"worker_id": o.worker_id},
                )
            elif kind == "stale_result":
                m.stale_results.inc()
                if self._log_once.first((kind, o.worker_id)):
                    log.warning(
                        "refused result from %s: %s (more are counted, logged again in a minute)",
                        o.worker_id,
                        o.detail,
                        extra={"worker_id": o.worker_id, "lease_id": o.lease_id},
                    )
            elif kind == "clock_offset":
                m.clock_offset_rejections.labels(o.worker_id).inc()
                if self._log_once.first((kind, o.worker_id)):
                    log.warning(
                        "worker %s clock is %d ms ahead; its HLC was not merged",
                        o.worker_id,
                        o.value,
                        extra={"worker_id": o.worker_id},
                    )
            elif kind == "worker_connected":
                log.info("worker %s connected", o.worker_id, extra={"worker_id": o.worker_id})
            elif kind == "worker_disconnected":
                log.info("worker %s disconnected", o.worker_id, extra={"worker_id": o.worker_id})
                if o.worker_id not in workers:
                    # Per-worker series live only while the worker does: a caller that makes up
                    # worker ids must not grow the label set without bound.
                    with contextlib.suppress(KeyError):
                        m.clock_offset_rejections.remove(o.worker_id)
            elif kind == "report_refused":
                m.reports_refused.labels(o.detail).inc()
                # Once a minute per worker and kind: a worker can name any number of leases.
                if self._log_once.first((kind, o.worker_id, o.detail)):
                    log.warning(
                        "refused %s report from worker %s for lease %.200s: the session does not"
                        " hold it (more are counted, logged again in a minute)",
                        o.detail,
                        o.worker_id,
                        o.lease_id,
                        extra={"worker_id": o.worker_id, "lease_id": o.lease_id},
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

    def observe_records(self, records: list[pb.HistoryEvent]) -> None:
        """Counts what a commit recorded (leases, endings, retries, workflows); the spans are
        :meth:`Tracing.on_records`'s."""
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
            elif typ == E.EVENT_TYPE_ACTION_RETRY_SCHEDULED:
                m.retries.inc()
            elif typ == E.EVENT_TYPE_WORKFLOW_SUBMITTED:
                m.workflows_submitted.inc()
            elif typ == E.EVENT_TYPE_WORKFLOW_FINISHED:
                state = pb.WorkflowState.Name(ev.workflow_state)
                m.workflows_finished.labels(state.removeprefix("WORKFLOW_STATE_").lower()).inc()
        if granted:
            m.leases_granted.inc(granted)
        for state, n in finished_by_state.items():
            m.actions_finished.labels(state.removeprefix("ACTION_STATE_").lower()).inc(n)
        self.tracing.on_records(records)


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
