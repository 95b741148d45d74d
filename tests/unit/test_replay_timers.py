"""Timers are state: a restart (replay of the journal) keeps every timer the live core armed.

Also the fan-out kind asked in one place (a pipeline is never leased to a worker), and the
core bugs the extended state machine found (each a regression test here).
"""

from __future__ import annotations

from plait.coordinator.core.events import Instant, RetryRequested
from plait.coordinator.core.input_limits import Limits
from plait.coordinator.core.replay import happened_at, replay
from plait.coordinator.core.state import SchedulerState
from plait.spec.validate import validate_submit
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, grants, same_timers, snapshot, timers

FAIL = wpb.ACTION_OUTCOME_FAILED


def restarted(d: Driver, later: float = 0.0) -> Driver:
    """A coordinator restarted ``later`` seconds after ``d`` stopped: the journal replayed."""
    fresh = Driver()
    fresh.mono, fresh.wall = d.mono + later, d.wall + int(later * 1000)
    fresh.st = SchedulerState(CONFIG)
    replay(fresh.st, d.records, fresh.at())
    fresh.records = list(d.records)
    return fresh


def retry(d: Driver, wf_id: str = "wf-1") -> object:
    out = d.handle(RetryRequested("retry", wf_id, reply=object()))
    return out.replies[0][1]


def queue_timed_chain() -> pb.WorkflowSpec:
    """a0 -> a1, where a1 has a queue timeout of 10 s and a handler no worker offers."""
    s = pb.WorkflowSpec(name="q")
    s.actions.add(id="a0", handler="h")
    a1 = s.actions.add(id="a1", handler="nobody", needs=["a0"])
    a1.queue_timeout.FromSeconds(10)
    return s


def test_a_non_root_queue_timeout_fires_after_a_restart() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (a0,) = grants(d.submit(queue_timed_chain()))
    d.finish("s1", a0)  # a1 is READY from now: its queue timeout runs
    assert d.state("a1") == "ACTION_STATE_READY"
    d.advance(3.0)
    r = restarted(d, later=2.0)  # down for 2 s: 5 s of the 10 have passed
    assert same_timers(timers(r.st), timers(d.st))
    r.advance(4.9)
    assert r.state("a1") == "ACTION_STATE_READY"
    r.advance(0.2)  # 10.1 s after it became ready, as the live core would have
    assert r.state("a1") == "ACTION_STATE_TIMED_OUT"
    d.advance(7.1)
    assert d.state("a1") == "ACTION_STATE_TIMED_OUT"  # the live core agrees


def test_roots_with_the_same_queue_timeout_are_armed_together() -> None:
    # Their heap entries tied on (due, sequence) and compared ActionRecords: submit raised.
    s = pb.WorkflowSpec(name="q")
    for i in range(3):
        s.actions.add(id=f"a{i}", handler="h").queue_timeout.FromSeconds(10)
    d = Driver()
    d.submit(s)
    d.advance(11.0)
    assert {d.state(f"a{i}") for i in range(3)} == {"ACTION_STATE_TIMED_OUT"}


def speculative_spec() -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="h")
    a = s.actions.add(id="a0", handler="h")
    a.speculate.after.FromSeconds(2)
    a.heartbeat_timeout.FromSeconds(3)
    a.timeout.FromSeconds(30)
    return s


def test_hedge_deadline_survives_a_restart() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(speculative_spec()))
    d.advance(1.0)
    r = restarted(d)
    live, replayed = timers(d.st), timers(r.st)
    assert replayed["hedge"] == live["hedge"] == [(lease.lease_id, d.mono + 1.0)]
    assert replayed["run"] == live["run"] == [(lease.lease_id, d.mono + 29.0)]
    report = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=1, slots=1)
    r.hello("s2", "w1", slots=1, running=[report])  # re-adopted
    r.hello("s3", "w2", slots=1)
    progress = wpb.LeaseProgress(lease_id=lease.lease_id, fencing_token=1)
    r.msg("s2", action_progress=wpb.ActionProgress(leases=[progress]))
    out = r.advance(1.5)  # past the threshold: a second attempt on the other worker
    (hedge,) = grants(out, "s3")
    assert hedge.action_id == "a0" and hedge.fencing_token == 2


def test_progress_deadline_is_rearmed_by_replay() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(speculative_spec()))
    d.advance(2.5)
    r = restarted(d)
    assert timers(r.st)["progress"] == timers(d.st)["progress"] == [(lease.lease_id,)]
    r.advance(2.9)  # progress waits restart at the replay (reports are not journalled)
    assert r.state("a0") == "ACTION_STATE_LEASED"
    r.advance(0.2)
    assert r.state("a0") == "ACTION_STATE_TIMED_OUT"
    assert "heartbeat_timeout" in r.st.workflows["wf-1"].actions["a0"].reason


def test_retry_backoff_run_timeout_and_deadline_survive_a_restart() -> None:
    s = pb.WorkflowSpec(name="t")
    s.deadline.FromSeconds(60)
    a = s.actions.add(id="a0", handler="h")
    a.retry.max_attempts = 3
    a.retry.initial_backoff.FromSeconds(4)
    a.retry.jitter = 0.0
    a.timeout.FromSeconds(20)
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (first,) = grants(d.submit(s))
    d.advance(1.0)
    d.finish("s1", first, outcome=FAIL)  # retry in 4 s
    d.advance(1.0)
    r = restarted(d, later=0.5)
    live, replayed = timers(d.st), timers(r.st)
    assert replayed["retry_at"] == live["retry_at"] == [("wf-1/a0", d.mono + 3.0)]
    assert replayed["workflow_deadline"] == live["workflow_deadline"]
    assert same_timers(replayed, live)
    r.hello("s2", "w1", slots=1)
    assert grants(r.advance(2.0)) == []  # 2.5 s after the restart: backoff not over
    (second,) = grants(r.advance(0.6))  # 4.1 s after the failure
    assert second.fencing_token == 2
    assert same_timers(timers(restarted(r).st), timers(r.st))  # and the run timeout


def test_a_retried_workflow_gets_a_fresh_deadline_that_replay_keeps() -> None:
    s = pb.WorkflowSpec(name="d")
    s.deadline.FromSeconds(5)
    s.actions.add(id="a0", handler="h")
    d = Driver()
    d.submit(s)
    d.advance(6.0)  # no worker: the deadline ends it
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_FAILED
    assert retry(d) == ["a0"]
    r = restarted(d)
    # The first run's deadline is past; replay must not end the retried run with it.
    r.advance(0.1)
    assert r.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_RUNNING
    assert same_timers(timers(r.st), timers(d.st))
    r.advance(5.0)
    assert r.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_FAILED


def fan_out(kind: str, src_outputs: str) -> tuple[Driver, list[wpb.Lease]]:
    """``src`` -> ``fan`` (a map or pipeline over ``src.items``); ``src`` finished with
    ``src_outputs``; returns the grants that followed."""
    s = pb.WorkflowSpec(name="f")
    s.actions.add(id="src", handler="h")
    p = s.actions.add(id="fan", handler="h", needs=["src"])
    if kind == "pipeline":
        p.pipeline.over = "src.items"
        p.pipeline.stages.add(id="one", handler="h")
        p.pipeline.stages.add(id="two", handler="h")
    else:
        p.map.over = "src.items"
    d = Driver()
    d.hello("s1", "w1", slots=4)
    (src,) = grants(d.submit(s))
    return d, grants(d.finish("s1", src, outputs=src_outputs))


def test_retry_of_a_pipeline_whose_expansion_failed_expands_it_again() -> None:
    # retry.py asked "map?" only: the pipeline container itself was leased to a worker.
    for kind in ("pipeline", "map"):
        d, _ = fan_out(kind, '{"items": "not a list"}')
        assert d.state("fan") == "ACTION_STATE_FAILED"
        d.msg("s1", credit=wpb.Credit(slots=1))
        out = d.handle(RetryRequested("retry", "wf-1", reply=object()))
        assert out.replies[0][1] == ["fan"]
        assert [g.action_id for g in grants(out)] == []  # nothing for a worker to run
        assert d.state("fan") == "ACTION_STATE_FAILED"  # the list is still not a list
        (err,) = [e for e in out.records if e.type == pb.EVENT_TYPE_ACTION_FINISHED]
        assert "expected a list" in err.message
        assert snapshot(restarted(d).st) == snapshot(d.st)


def test_retry_of_a_pipeline_reruns_a_failed_stage_before_the_next() -> None:
    d, (one,) = fan_out("pipeline", '{"items": [1]}')
    assert one.action_id == "fan.0.one"
    d.finish("s1", one, outcome=FAIL)  # stage two is skipped, the pipeline fails
    d.msg("s1", credit=wpb.Credit(slots=1))
    assert d.state("fan.0.two") == "ACTION_STATE_SKIPPED"
    out = d.handle(RetryRequested("retry", "wf-1", reply=object()))
    # Stage one runs again; stage two waits for it (it used to be readied at once).
    assert [g.action_id for g in grants(out)] == ["fan.0.one"]
    assert d.state("fan.0.two") == "ACTION_STATE_PENDING"
    (again,) = grants(out)
    (two,) = grants(d.finish("s1", again))
    assert two.action_id == "fan.0.two"
    d.finish("s1", two)
    assert d.st.workflows["wf-1"].state == pb.WORKFLOW_STATE_SUCCEEDED
    assert snapshot(restarted(d).st) == snapshot(d.st)


def test_a_map_whose_any_join_cancels_the_rest_finishes_once() -> None:
    # A child's cancellation settled the map inside the settling that cancelled it; the outer
    # settling then finished the map a second time (SUCCEEDED -> SUCCEEDED raised).
    s = pb.WorkflowSpec(name="m")
    s.actions.add(id="src", handler="h")
    m = s.actions.add(id="fan", handler="h", needs=["src"])
    m.map.over = "src.items"
    m.join.kind = pb.JOIN_KIND_ANY
    m.join.cancel_remaining = True
    d = Driver()
    d.hello("s1", "w1", slots=4)
    (src,) = grants(d.submit(s))
    children = grants(d.finish("s1", src, outputs='{"items": [1, 2]}'))
    d.finish("s1", children[0])
    assert d.state("fan") == "ACTION_STATE_SUCCEEDED"
    assert d.state("fan.1") == "ACTION_STATE_CANCELLED"
    assert snapshot(restarted(d).st) == snapshot(d.st)


def test_retry_of_a_cancelled_map_reruns_its_children() -> None:
    d, _ = fan_out("map", '{"items": [1, 2]}')
    d.cancel()
    assert d.state("fan") == "ACTION_STATE_CANCELLED"
    d.msg("s1", credit=wpb.Credit(slots=4))
    out = d.handle(RetryRequested("retry", "wf-1", reply=object()))
    assert sorted(g.action_id for g in grants(out)) == ["fan.0", "fan.1"]
    assert d.state("fan") == "ACTION_STATE_RUNNING"
    assert snapshot(restarted(d).st) == snapshot(d.st)


def test_replay_dates_each_event_by_its_wall_clock_age() -> None:
    d = Driver()
    d.submit(queue_timed_chain())
    ev = d.records[0]  # 7 s later, on a monotonic clock with another origin:
    assert happened_at(ev, Instant(500.0, d.wall + 7000)) == 493.0
    assert happened_at(ev, Instant(500.0, d.wall - 1000)) == 500.0  # wall set back: now


def test_a_join_over_a_pipelines_items_is_validated_like_one_over_a_maps() -> None:
    for kind in ("map", "pipeline"):
        s = pb.WorkflowSpec(name="v")
        s.actions.add(id="src", handler="h")
        fan = s.actions.add(id="fan", needs=["src"])
        getattr(fan, kind).over = "src.items"
        if kind == "map":
            fan.handler = "h"
        if kind == "pipeline":
            fan.pipeline.stages.add(id="one", handler="h")
        fan.join.kind = pb.JOIN_KIND_AT_LEAST
        fan.join.at_least_count = 3  # of its items, not of its one need
        validate_submit(s, "", Limits())  # raised for the pipeline: "must be 1 to 1 (needs)"
