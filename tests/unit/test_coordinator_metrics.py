"""The coordinator's metrics fed from real core records and state (the core driver, by hand).

Every commit's records and observations go through :class:`Observations` as the runtime hands
them over; the state gauges are read from the live core as a scrape would.
"""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from plait.clock import ManualClock
from plait.coordinator.core.events import Stimulus
from plait.coordinator.core.model import Outcome
from plait.coordinator.metrics import CoordinatorMetrics
from plait.coordinator.observations import Observations, state_gauges
from plait.coordinator.tracing import Tracing
from plait.tracecontext import trace_id_for
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import RecordingDriver, grants


class MeteredDriver(RecordingDriver):
    """A driver whose every batch is observed as the runtime observes a delivered commit."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = CoordinatorMetrics()
        self.obs = Observations(self.metrics, Tracing(), ManualClock())

    def handle(self, *stimuli: Stimulus) -> Outcome:
        out = super().handle(*stimuli)
        self.obs.observe_records(self.st, out.records, self.mono)
        self.obs.observe(out.observations, self.st)
        return out

    def value(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


def fork_join_spec() -> pb.WorkflowSpec:
    """a -> (b, c, m: a map over a's items) -> j joins b and c."""
    s = pb.WorkflowSpec(name="fj")
    s.actions.add(id="a", handler="h")
    s.actions.add(id="b", handler="h", needs=["a"])
    s.actions.add(id="c", handler="h", needs=["a"])
    m = s.actions.add(id="m", handler="h", needs=["a"])
    m.map.over = "a.items"
    s.actions.add(id="j", handler="h", needs=["b", "c"])
    return s


def test_schedule_to_start_measures_ready_to_started_with_the_workflow_trace_id() -> None:
    d = MeteredDriver()
    out = d.submit(fork_join_spec())  # no worker yet: the root waits READY
    d.advance(1.5)
    out = d.hello("s1", "w1", slots=8)
    (lease_a,) = grants(out)
    d.advance(0.5)
    d.started("s1", lease_a)
    assert d.value("plait_schedule_to_start_seconds_count") == 1
    assert d.value("plait_schedule_to_start_seconds_sum") == 2.0

    # b and c become READY when a succeeds, the map's children when it expands; all are
    # leased at once and start a second later.
    out = d.done("s1", lease_a, outputs=json.dumps({"items": [1, 2, 3]}))
    leases = grants(out)
    assert sorted(x.action_id for x in leases) == ["b", "c", "m.0", "m.1", "m.2"]
    d.advance(1.0)
    d.started("s1", *leases)
    assert d.value("plait_schedule_to_start_seconds_count") == 6
    assert d.value("plait_schedule_to_start_seconds_sum") == 2.0 + 5 * 1.0

    text = generate_openmetrics(d.metrics.registry).decode()
    trace = f"{trace_id_for('wf-1'):032x}"
    lines = [x for x in text.splitlines() if x.startswith("plait_schedule_to_start_seconds_bucket")]
    assert any(f'# {{trace_id="{trace}"}}' in x for x in lines), lines
    j = d.st.workflows["wf-1"].actions["j"]
    assert j.ready_at == 0.0  # j is PENDING: no wait has begun; m runs as its children
    granted = [x for lease in leases for x in grants(d.done("s1", lease))]
    assert j.state == pb.ACTION_STATE_LEASED
    assert j.ready_at == d.mono  # j: ready (and leased) now, not started: its wait begins
    (lease_j,) = [x for x in granted if x.action_id == "j"]
    d.advance(0.5)
    d.started("s1", lease_j)
    assert d.value("plait_schedule_to_start_seconds_count") == 7
    assert d.value("plait_schedule_to_start_seconds_sum") == 2.0 + 5 * 1.0 + 0.5


def test_a_retry_waits_from_the_end_of_its_backoff() -> None:
    d = MeteredDriver()
    s = pb.WorkflowSpec(name="retry")
    a = s.actions.add(id="a", handler="h")
    a.retry.max_attempts = 2
    a.retry.initial_backoff.FromMilliseconds(2000)
    d.hello("s1", "w1")
    (lease,) = grants(d.submit(s))
    d.started("s1", lease)
    assert d.value("plait_schedule_to_start_seconds_sum") == 0.0
    d.done("s1", lease, outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    assert d.value("plait_action_retries_total") == 1
    out = d.advance(2.5)  # the backoff ends (jittered at most to 2 s), the retry is granted
    (again,) = grants(out)
    d.advance(1.0)
    d.started("s1", again)
    assert d.value("plait_schedule_to_start_seconds_count") == 2
    # From the end of the backoff (at most 2 s after the failure) to the start 3.5 s after it.
    assert 1.5 <= d.value("plait_schedule_to_start_seconds_sum") <= 3.5


def test_forks_and_joins_are_counted_with_their_kind_and_wait() -> None:
    d = MeteredDriver()
    d.hello("s1", "w1", slots=8)
    (lease_a,) = grants(d.submit(fork_join_spec()))
    leases = grants(d.done("s1", lease_a, outputs=json.dumps({"items": [1, 2, 3]})))
    assert d.value("plait_fork_width_count", kind="dependents") == 1
    assert d.value("plait_fork_width_sum", kind="dependents") == 3  # b, c, m
    assert d.value("plait_fork_width_sum", kind="map") == 3
    by_id = {x.action_id: x for x in leases}
    d.done("s1", by_id["b"])
    d.advance(2.0)
    d.done("s1", by_id["c"])  # j's join (all of b, c) is met 2 s after b ended
    assert d.value("plait_joins_total", join="all", outcome="met") == 1
    assert d.value("plait_join_wait_seconds_sum", join="all") == 2.0
    for child in ("m.0", "m.1"):
        d.done("s1", by_id[child])
    d.done("s1", by_id["m.2"], outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    assert d.value("plait_joins_total", join="all", outcome="impossible") == 1


def test_refused_results_are_split_by_reason() -> None:
    d = MeteredDriver()
    s = pb.WorkflowSpec(name="two")
    s.actions.add(id="a", handler="h")
    d.hello("s1", "w1", slots=1)
    (old,) = grants(d.submit(s))
    d.advance(3.0)
    d.msg("s1", credit=wpb.Credit(slots=0))  # not silent, so the session stays open
    d.advance(3.0)  # but no heartbeat: the lease expires; the action is READY again
    assert d.value("plait_leases_lost_total", reason="lease_expired") == 1
    (new,) = grants(d.hello("s2", "w2", slots=1))
    d.done("s1", old)  # w1's late result: a newer token was granted and the action goes on
    assert d.value("plait_results_refused_total", reason="superseded") == 1
    d.done("s2", old)  # w2 never held that lease
    assert d.value("plait_results_refused_total", reason="not_held") == 1
    assert d.value("plait_worker_reports_refused_total", report="result") == 1
    d.cancel()
    d.done("s2", new)  # the late result of a cancelled action: ordinary
    assert d.value("plait_results_refused_total", reason="cancelled") == 1
    assert d.value("plait_results_refused_total", reason="superseded") == 1


def test_state_gauges_read_the_live_core() -> None:
    d = MeteredDriver()
    d.hello("s1", "w1", slots=3)
    spec = fork_join_spec()
    spec.actions.add(id="x", needs=["a"]).exec.argv.append("true")  # no exec worker: waits
    (lease_a,) = grants(d.submit(spec))
    d.started("s1", lease_a)
    g = state_gauges(d.st, d.mono, d.wall)
    assert g.workflows_running == 1
    assert g.actions == {"running": 1, "pending": 5}  # b, c, m, x, j
    assert g.workers["w1"].slots == 3 and g.workers["w1"].slots_used == 1
    out = d.done("s1", lease_a, outputs=json.dumps({"items": [1, 2, 3, 4]}))
    leased = grants(out)  # 3 slots: 3 of b, c, x, m.0..m.3 are leased, the rest wait
    assert len(leased) == 3
    d.advance(0.75)
    g = state_gauges(d.st, d.mono, d.wall)
    assert g.actions["leased"] == 3 and g.actions["ready"] == 4
    assert sum(g.queue_depth.values()) == 4
    assert g.queue_depth == {"exec": 1, "handler": 3}
    children = sum(1 for x in leased if x.action_id.startswith("m."))
    assert g.items_in_flight.get("map", 0) == children
    assert g.workers["w1"].slots_used == 3
    assert g.workers["w1"].heartbeat_age == 0.75
    assert g.workers["w1"].clock_offset == 0.0  # its stamps read our wall clock


def test_per_worker_series_go_with_the_worker() -> None:
    d = MeteredDriver()
    d.metrics.read_state_from(lambda: state_gauges(d.st, d.mono, d.wall))
    d.hello("s1", "w1")
    d.hello("s2", "w2", slots=2)
    text = generate_latest(d.metrics.registry).decode()
    assert 'plait_worker_slots{worker="w2"} 2.0' in text
    assert 'plait_worker_heartbeat_age_seconds{worker="w1"}' in text
    d.close("s2")  # holds no lease: forgotten at once
    text = generate_latest(d.metrics.registry).decode()
    assert 'worker="w2"' not in text
    assert 'plait_worker_slots{worker="w1"} 4.0' in text
    assert 'plait_actions{state="pending"} 0.0' in text


def test_no_created_series_and_build_info() -> None:
    m = CoordinatorMetrics()
    m.results_refused.labels("superseded").inc()
    m.schedule_to_start.observe(0.1)
    text = generate_latest(m.registry).decode()
    assert "_created" not in text
    assert "plait_stale_results_refused_total" not in text
    (line,) = [x for x in text.splitlines() if x.startswith("plait_build_info{")]
    assert 'version="' in line and 'python="' in line and line.endswith(" 1.0")
    assert "plait_leader 0.0" in text and "plait_term 0.0" in text
