"""Every Prometheus metric of the coordinator, in one place (edge layer).

Names follow Prometheus conventions: ``plait_`` prefix, base units, ``_total`` counters,
``_seconds`` durations; no per-workflow labels (unbounded cardinality). The registry is our
own, served on its own port.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Every ``*_created`` series doubles the counters and histograms for a value nobody graphs
# (and that resets with each restart); the switch is process-wide, so it is thrown before any
# metric is made.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
_WIDTH_BUCKETS = (1, 2, 3, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000, 100000)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


ACTION_STATES = ("pending", "ready", "leased", "running")
QUEUE_CLASSES = ("exec", "handler")
ITEM_KINDS = ("map", "pipeline")


@dataclass(frozen=True, slots=True)
class WorkerGauges:
    """One known worker, as the core sees it at one instant."""

    heartbeat_age: float  # seconds since its last heartbeat renewed its leases
    clock_offset: float | None  # seconds its HLC read ahead of ours; None: never measured
    slots: int
    slots_used: int
    prefetched: int = 0  # slots' worth of leases granted beyond its free slots
    prefetch_depth: int = 0  # how far beyond its free slots it is granted now


@dataclass(slots=True)
class StateGauges:
    """What the scheduling core holds at one instant: the gauges computed at scrape time."""

    actions: dict[str, int] = field(default_factory=dict)  # live actions by lower-case state
    workflows_running: int = 0
    queue_depth: dict[str, int] = field(default_factory=dict)  # READY actions by class
    items_in_flight: dict[str, int] = field(default_factory=dict)  # leased/running children
    workers: dict[str, WorkerGauges] = field(default_factory=dict)


class CoordinatorMetrics:
    """The coordinator's metrics on a private registry.

    Counters and histograms are fed as things happen (:mod:`~plait.coordinator.observations`);
    the gauges of the core's state (actions by state, queue depth, per-worker gauges ...) are
    computed only when scraped, from :meth:`read_state_from`'s source, so the scheduling loop
    pays nothing for them between scrapes and a gone worker's series simply stop appearing.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.workflows_submitted = Counter(
            "plait_workflows_submitted_total", "Workflows accepted.", registry=r
        )
        self.workflows_finished = Counter(
            "plait_workflows_finished_total",
            "Workflows that reached a terminal state.",
            ["state"],
            registry=r,
        )
        self.actions_finished = Counter(
            "plait_actions_finished_total",
            "Actions that reached a terminal state.",
            ["state"],
            registry=r,
        )
        self.leases_granted = Counter(
            "plait_leases_granted_total", "Leases granted to workers.", registry=r
        )
        self.leases_lost = Counter(
            "plait_leases_lost_total",
            "Leases lost (expired, not reported, worker left); the action ran again.",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "plait_action_retries_total", "Failed attempts scheduled to run again.", registry=r
        )
        self.results_refused = Counter(
            "plait_results_refused_total",
            "Results refused, by reason: superseded (a newer token exists: a zombie attempt),"
            " cancelled (the late result of a cancelled action: ordinary), not_live (the"
            " action's lease ended otherwise), unknown_lease (no such action), not_held (the"
            " reporting worker was never granted that lease).",
            ["reason"],
            registry=r,
        )
        # Every reason exists from the start at 0, so increase() sees the first refusal too.
        for reason in ("superseded", "cancelled", "not_live", "unknown_lease", "not_held"):
            self.results_refused.labels(reason)
        self.reports_refused = Counter(
            "plait_worker_reports_refused_total",
            "Worker reports (started, progress, logs, result) for a lease the session does not"
            " hold; nothing was journalled.",
            ["report"],
            registry=r,
        )
        self.auth_refusals = Counter(
            "plait_auth_refusals_total",
            "Calls refused UNAUTHENTICATED or PERMISSION_DENIED, by RPC (from the one RPC table).",
            ["rpc", "code"],
            registry=r,
        )
        self.hellos_refused = Counter(
            "plait_worker_hellos_refused_total",
            "Hellos refused because the worker id was connected and the new stream did not prove"
            " to be that worker.",
            registry=r,
        )
        self.input_refused = Counter(
            "plait_input_refused_total",
            "Input refused as malformed or over a limit (INVALID_ARGUMENT, an attempt failed for"
            " its outputs, progress details dropped, a tail truncated), by source (client,"
            " worker) and field path without indices.",
            ["source", "field"],
            registry=r,
        )
        self.internal_errors = Counter(
            "plait_internal_errors_total",
            "Unexpected exceptions that ended one RPC or stream with INTERNAL (where: the RPC),"
            " or one stimulus (where: core; the state was rebuilt from the journal).",
            ["where"],
            registry=r,
        )
        self.core_rebuilds = Counter(
            "plait_core_rebuilds_total",
            "Times the scheduling core was rebuilt from the journal after an internal error.",
            registry=r,
        )
        self.clock_offset_rejections = Counter(
            "plait_clock_offset_rejections_total",
            "Messages whose HLC was too far ahead to merge (max_clock_offset).",
            ["worker"],
            registry=r,
        )
        self.workers_connected = Gauge(
            "plait_workers_connected", "Worker streams currently open.", registry=r
        )
        self.workers_revoked = Gauge(
            "plait_workers_revoked",
            "Worker ids revoked by an operator and refused until reinstated.",
            registry=r,
        )
        self.ready_actions = Gauge(
            "plait_ready_actions", "Actions ready and waiting for a slot.", registry=r
        )
        self.live_log_bytes = Gauge(
            "plait_live_log_bytes",
            "Running attempts' output kept in memory for followers (live logs; bounded).",
            registry=r,
        )
        self.live_log_dropped = Counter(
            "plait_live_log_dropped_bytes_total",
            "Live output dropped to stay within the per-attempt and total bounds.",
            registry=r,
        )
        self.schedule_to_start = Histogram(
            "plait_schedule_to_start_seconds",
            "From an action becoming ready (or its retry backoff ending) to its attempt"
            " starting on a worker.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.fork_width = Histogram(
            "plait_fork_width",
            "Branches per fork point: the dependents of a succeeded action with several, the"
            " children of a map, the items of a pipeline.",
            ["kind"],
            buckets=_WIDTH_BUCKETS,
            registry=r,
        )
        self.join_wait = Histogram(
            "plait_join_wait_seconds",
            "From a join's first need (or child) ending to the join being resolved.",
            ["join"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.joins = Counter(
            "plait_joins_total",
            "Joins resolved, by kind (all, any, at_least) and outcome (met, impossible).",
            ["join", "outcome"],
            registry=r,
        )
        self.leader = Gauge(
            "plait_leader",
            "1 while this coordinator leads (writes the journal), 0 as a standby.",
            registry=r,
        )
        self.term = Gauge(
            "plait_term",
            "The leadership term (epoch) this coordinator was elected with; 0 until elected.",
            registry=r,
        )
        self._state: Callable[[], StateGauges | None] = lambda: None
        r.register(_StateCollector(self))
        self.build_info = Gauge(
            "plait_build_info",
            "Always 1; the labels name the running Plait version and Python version.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.action_duration = Histogram(
            "plait_action_duration_seconds",
            "Run time of attempts, as measured by the worker.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.journal_commit = Histogram(
            "plait_journal_commit_seconds",
            "Time to durably commit one journal batch.",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.journal_batch = Histogram(
            "plait_journal_batch_events",
            "Events per journal commit (group commit).",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=r,
        )

    def read_state_from(self, source: Callable[[], StateGauges | None]) -> None:
        """Where the state gauges come from at scrape time (None: no core, none exported).

        ``source`` is called on the scraping thread; it must return a consistent copy.
        """
        self._state = source

    def state_gauges(self) -> StateGauges | None:
        """The current state gauges from the source, or None."""
        return self._state()


class _StateCollector(Collector):
    """The gauges of the core's state, read from one snapshot per scrape."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.metrics.state_gauges()))

    @staticmethod
    def _families(s: StateGauges | None) -> list[Metric]:
        actions = GaugeMetricFamily(
            "plait_actions",
            "Live actions by state (terminal ones are not counted).",
            labels=["state"],
        )
        running = GaugeMetricFamily("plait_workflows_running", "Workflows not yet finished.")
        queue = GaugeMetricFamily(
            "plait_queue_depth",
            "Ready actions waiting for a worker, by the kind of worker that can run them (exec:"
            " workerd, handler: an SDK worker serving the handler).",
            labels=["class"],
        )
        flight = GaugeMetricFamily(
            "plait_items_in_flight",
            "Map children and pipeline stage actions holding a lease (leased or running).",
            labels=["kind"],
        )
        age = GaugeMetricFamily(
            "plait_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat renewed its leases.",
            labels=["worker"],
        )
        offset = GaugeMetricFamily(
            "plait_worker_clock_offset_seconds",
            "How far the worker's last HLC stamp read ahead of the coordinator's clock when it"
            " arrived (a clock behind reads about 0: the HLC carries the later of the two).",
            labels=["worker"],
        )
        slots = GaugeMetricFamily(
            "plait_worker_slots", "Slots the worker offers.", labels=["worker"]
        )
        used = GaugeMetricFamily(
            "plait_worker_slots_used",
            "Slots of the worker the coordinator counts as held by leases.",
            labels=["worker"],
        )
        prefetched = GaugeMetricFamily(
            "plait_worker_prefetched_slots",
            "Slots' worth of leases granted to the worker beyond its free slots (queued there,"
            " started as slots free).",
            labels=["worker"],
        )
        depth = GaugeMetricFamily(
            "plait_worker_prefetch_depth",
            "How many slots' worth of leases the worker is granted beyond its free slots now"
            " (adapts to its attempts' run times; 0: no prefetch).",
            labels=["worker"],
        )
        if s is not None:
            for state in ACTION_STATES:
                actions.add_metric([state], s.actions.get(state, 0))
            running.add_metric([], s.workflows_running)
            for cls in QUEUE_CLASSES:
                queue.add_metric([cls], s.queue_depth.get(cls, 0))
            for kind in ITEM_KINDS:
                flight.add_metric([kind], s.items_in_flight.get(kind, 0))
            for worker, w in s.workers.items():
                age.add_metric([worker], w.heartbeat_age)
                if w.clock_offset is not None:
                    offset.add_metric([worker], w.clock_offset)
                slots.add_metric([worker], w.slots)
                used.add_metric([worker], w.slots_used)
                prefetched.add_metric([worker], w.prefetched)
                depth.add_metric([worker], w.prefetch_depth)
        return [actions, running, queue, flight, age, offset, slots, used, prefetched, depth]


def _version() -> str:
    try:
        return metadata.version("plait")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
