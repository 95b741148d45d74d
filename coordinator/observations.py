r"""What the core observed, as metrics and logs (edge layer).

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
from plait.coordinator.metrics import CoordinatorMetrics
from plait.coordinator.services.errors import Throttle
from plait.coordinator.tracing import Tracing

log = logging.getLogger("plait.coordinator.runtime")  # where these lines always were


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
                m.leases_lost.labels(_loss_reason(o.detail)).inc()
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


def _loss_reason(detail: str) -> str:
    if detail.startswith("lease expired"):
        return "expired"
    if detail.startswith("worker revoked"):
        return "worker_revoked"
    if "self-fencing" in detail:
        return "worker_cancelled"
    if "did not report" in detail:
        return "not_reported"
    if "reconnected" in detail:
        return "not_readopted"
    if "left" in detail:
        return "worker_left"
    return "other"
