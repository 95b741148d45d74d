"""Speculative execution: a hedge on another worker, first success wins, the loser fenced."""

from __future__ import annotations

from plait.coordinator.core.events import Instant
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, grants, messages, snapshot


def hedged(after_s: float = 2.0, p95: bool = False, n: int = 1) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="slow")
    for i in range(n):
        a = s.actions.add(id=f"a{i}", handler="h")
        if after_s:
            a.speculate.after.FromMilliseconds(int(after_s * 1000))
        a.speculate.after_p95 = p95
    return s


def two_workers(d: Driver) -> None:
    d.hello("s1", "w1", slots=4)
    d.hello("s2", "w2", slots=4)


def heartbeat_both(d: Driver, seq: int) -> None:
    d.heartbeat("s1", [], seq=seq, last_grant=0)
    d.heartbeat("s2", [], seq=seq, last_grant=0)


def test_a_slow_attempt_gets_a_hedge_on_another_worker_and_the_first_success_wins() -> None:
    d = Driver()
    two_workers(d)
    (primary,) = grants(d.submit(hedged()))
    d.advance(1.0)
    heartbeat_both(d, 1)
    out = d.advance(1.1)
    (hedge,) = grants(out)
    assert hedge.fencing_token == 2 and hedge.attempt == 2
    assert {primary.lease_id.split("/")[-1], hedge.lease_id.split("/")[-1]} == {"1", "2"}
    assert (primary.workflow_id, hedge.action_id) == ("wf-1", "a0")
    hedge_session = next(
        s for s, msgs in out.sends.items() if any(m.HasField("lease_grant") for m in msgs)
    )
    primary_session = "s1" if hedge_session == "s2" else "s2"
    win = d.finish(hedge_session, hedge, outputs='{"by": "hedge"}')
    cancelled = [
        c.lease_id
        for m in messages(win, primary_session, "cancel_lease")
        for c in m.cancel_lease.leases
    ]
    assert cancelled == [primary.lease_id]
    late = d.finish(primary_session, primary)
    ack = messages(late, primary_session, "ack")[0].ack.results[0]
    assert ack.status.code == 9 and "superseded by 2" in ack.status.message
    assert d.state("a0") == "ACTION_STATE_SUCCEEDED"
    assert d.st.workflows["wf-1"].actions["a0"].outputs_json == '{"by": "hedge"}'


def test_a_failed_hedge_does_not_fail_the_action_while_the_other_runs() -> None:
    d = Driver()
    two_workers(d)
    (primary,) = grants(d.submit(hedged()))
    primary_session = "s1" if "w1" in d.st.leases[primary.lease_id].worker.worker_id else "s2"
    heartbeat_both(d, 1)
    d.advance(1.5)
    heartbeat_both(d, 2)
    (hedge,) = grants(d.advance(1.0))
    hedge_session = "s2" if primary_session == "s1" else "s1"
    out = d.finish(hedge_session, hedge, outcome=wpb.ACTION_OUTCOME_FAILED)
    assert out.records[-1].type == pb.EVENT_TYPE_LEASE_LOST
    assert d.state("a0") in ("ACTION_STATE_LEASED", "ACTION_STATE_RUNNING")
    d.finish(primary_session, primary, outputs='{"by": "primary"}')
    assert d.state("a0") == "ACTION_STATE_SUCCEEDED"
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono, d.wall))
    assert snapshot(fresh) == snapshot(d.st)


def test_no_hedge_without_another_worker() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=4)
    grants(d.submit(hedged()))
    d.advance(1.0)
    d.heartbeat("s1", [], seq=1, last_grant=0)
    assert grants(d.advance(1.5)) == []  # the only worker already runs it
    assert d.st.hedges_wanted  # waits for another worker
    (hedge,) = grants(d.hello("s2", "w2", slots=4))
    assert hedge.fencing_token == 2


def test_p95_threshold_comes_from_observed_successes() -> None:
    from plait.coordinator.core import hedges

    d = Driver()
    two_workers(d)
    for k in range(5):  # the same action in five workflows: 0.1 s to 0.5 s
        (lease,) = grants(d.submit(hedged(after_s=0, p95=True), f"wf-{k}"))
        d.advance(0.1 * (k + 1))
        session = "s1" if d.st.leases[lease.lease_id].worker.worker_id == "w1" else "s2"
        d.finish(session, lease)
        d.msg(session, credit=wpb.Credit(slots=1))
        heartbeat_both(d, k + 1)
    a = d.st.workflows["wf-0"].actions["a0"]
    assert (
        sorted(d.st.durations["a0"]) == [0.1 * (k + 1) for k in range(5)]
        or len(d.st.durations["a0"]) == 5
    )
    assert abs(hedges.threshold(d.st, a) - 0.5) < 1e-6  # type: ignore[operator]
    (slow,) = grants(d.submit(hedged(after_s=0, p95=True), "wf-slow"))
    assert grants(d.advance(0.4)) == []
    (hedge,) = grants(d.advance(0.2))
    assert hedge.workflow_id == "wf-slow" and hedge.fencing_token == 2
