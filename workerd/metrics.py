"""Every Prometheus metric of workerd, in one place (workerd layer).

Served on ``--metrics-listen`` (off by default; loopback unless ``--metrics-public``). Events
(attempts ending, sandbox kills) are counted as they happen, through the session's
:class:`~plait.worker.attempts.AttemptObserver`; the session's state (slots, connection,
reconnects, self-fences) is read at scrape time from the :class:`WorkerSession`. No
``*_created`` series; attempt durations carry an exemplar ``{trace_id=...}`` when the attempt
had a trace.
"""

from __future__ import annotations

import logging
import platform
import signal
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from plait import __version__
from plait.v1 import worker_service_pb2 as pb
from plait.worker.session import WorkerSession
from plait.worker.spans import outcome_name

__all__ = ["KILL_REASONS", "WorkerdMetrics", "kill_reason", "serve_metrics"]

log = logging.getLogger(__name__)

# Before any metric is registered: *_created series double the count of every counter and
# histogram, and nothing reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
KINDS = ("exec", "handler")
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")
KILL_REASONS = ("lease_lost", "timeout", "cancelled", "rlimit", "other")
_RLIMIT_SIGNALS = frozenset({-int(signal.SIGXCPU), -int(signal.SIGXFSZ)})
_OUTCOME_CODES = {
    code: outcome_name(code)
    for code in (
        pb.ACTION_OUTCOME_SUCCEEDED,
        pb.ACTION_OUTCOME_FAILED,
        pb.ACTION_OUTCOME_TIMED_OUT,
        pb.ACTION_OUTCOME_CANCELLED,
    )
}
"""The outcomes counted, by ``ActionOutcome`` value; all of :data:`OUTCOMES`."""


def kill_reason(result: pb.ActionResult, cause: str) -> str | None:
    """Why an exec attempt's processes were killed, or ``None`` when they were not.

    ``cause`` is why the worker cancelled the attempt (:data:`plait.worker.attempts.CancelCause`),
    empty when it did not.
    """
    if result.outcome == pb.ACTION_OUTCOME_TIMED_OUT:
        return "timeout"
    if result.outcome == pb.ACTION_OUTCOME_CANCELLED:
        return cause if cause in KILL_REASONS else "other"
    if result.outcome == pb.ACTION_OUTCOME_FAILED and result.exit_code in _RLIMIT_SIGNALS:
        return "rlimit"
    return None


class _SessionCollector(Collector):
    """The session's gauges and counters, read when scraped."""

    def __init__(self, metrics: WorkerdMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Any]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Any]:
        return iter(self._families(self._metrics.session))

    @staticmethod
    def _families(session: WorkerSession | None) -> list[Any]:
        stats = session.stats if session is not None else None
        slots = GaugeMetricFamily(
            "plait_workerd_slots",
            "Slots offered: the adaptive level, or --slots when adaptive concurrency is off.",
        )
        used = GaugeMetricFamily("plait_workerd_slots_used", "Slots held by running attempts.")
        connected = GaugeMetricFamily(
            "plait_workerd_connected", "1 while a stream to the coordinator is up and welcomed."
        )
        reconnects = CounterMetricFamily(
            "plait_workerd_reconnects",
            "Streams to a coordinator welcomed after the first (reconnects that succeeded).",
        )
        fences = CounterMetricFamily(
            "plait_workerd_self_fences",
            "Times workerd killed its attempts because no heartbeat was acknowledged in time.",
        )
        if session is not None and stats is not None:
            slots.add_metric([], session.offered_slots)
            used.add_metric([], session.slots - session.free_slots)
            connected.add_metric([], 1 if session.connected else 0)
            reconnects.add_metric([], max(0, stats.connects - 1))
            fences.add_metric([], stats.self_fences)
        else:
            for family in (slots, used, connected, reconnects, fences):
                family.add_metric([], 0)
        return [slots, used, connected, reconnects, fences]


class WorkerdMetrics:
    """workerd's metrics on a private registry; also the session's attempt observer."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.session: WorkerSession | None = None
        self.attempts = Counter(
            "plait_workerd_attempts_total",
            "Attempts that ended on this worker, by kind and outcome.",
            ["kind", "outcome"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "plait_workerd_attempt_duration_seconds",
            "Wall time of an attempt on this worker, start to result (exemplar: trace_id).",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.sandbox_kills = Counter(
            "plait_workerd_sandbox_kills_total",
            "Exec attempts whose processes were killed, by reason.",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "plait_build_info",
            "Always 1; the labels say which Plait and Python this is.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Every label combination from the start, so rates and dashboards see zeros; the
        # children are kept, so counting an attempt looks no labels up.
        self._durations: dict[str, Any] = {}
        self._attempts: dict[tuple[str, int], Any] = {}
        for kind in KINDS:
            self._durations[kind] = self.attempt_duration.labels(kind)
            for outcome in OUTCOMES:
                self.attempts.labels(kind, outcome)
            for code, outcome in _OUTCOME_CODES.items():
                self._attempts[(kind, code)] = self.attempts.labels(kind, outcome)
        for reason in KILL_REASONS:
            self.sandbox_kills.labels(reason)
        r.register(_SessionCollector(self))

    def attach(self, session: WorkerSession) -> None:
        """Reads the session's state at every scrape from now on."""
        self.session = session

    def attempt_finished(
        self, kind: str, result: pb.ActionResult, seconds: float, trace_id: str, cause: str
    ) -> None:
        """Counts an attempt that ended (:class:`plait.worker.attempts.AttemptObserver`)."""
        kind = kind if kind in KINDS else "handler"
        counter = self._attempts.get((kind, result.outcome))
        if counter is not None:
            counter.inc()
        exemplar = {"trace_id": trace_id} if trace_id else None
        self._durations[kind].observe(max(0.0, seconds), exemplar=exemplar)
        if kind == "exec":
            reason = kill_reason(result, cause)
            if reason is not None:
                self.sandbox_kills.labels(reason).inc()


def serve_metrics(metrics: WorkerdMetrics, host: str, port: int) -> tuple[Any, int]:
    """Starts the /metrics HTTP server in a thread; returns (server, the port it bound)."""
    httpd, _ = prometheus_client.start_http_server(port, host, registry=metrics.registry)
    return httpd, int(httpd.server_port)
