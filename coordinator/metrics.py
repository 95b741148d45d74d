"""Every Prometheus metric of the coordinator, in one place (edge layer).

Names follow Prometheus conventions: ``plait_`` prefix, base units, ``_total`` counters,
``_seconds`` durations; no per-workflow labels (unbounded cardinality). The registry is our
own, served on its own port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class CoordinatorMetrics:
    """The coordinator's metrics on a private registry."""

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
        self.stale_results = Counter(
            "plait_stale_results_refused_total",
            "Results refused because their fencing token was superseded.",
            registry=r,
        )
        self.reports_refused = Counter(
            "plait_worker_reports_refused_total",
            "Worker reports (started, progress, result) for a lease the session does not hold;"
            " nothing was journalled.",
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
