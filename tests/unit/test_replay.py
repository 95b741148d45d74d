"""Replaying the journal rebuilds exactly the state that wrote it."""

from __future__ import annotations

from plait.coordinator.core.events import Instant
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, chain, grants, independent, snapshot


def replayed(d: Driver, advance: float = 0.0) -> SchedulerState:
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono + advance, d.wall))
    return fresh


def test_replay_restores_every_action_and_workflow() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=3)
    s = chain(3)
    s.actions.add(id="flaky", handler="h").retry.max_attempts = 3
    s.actions.add(id="lost", handler="h")
    leases = {lease.action_id: lease for lease in grants(d.submit(s))}
    d.finish("s1", leases["a0"], outputs='{"x": 1}')
    d.finish("s1", leases["flaky"], outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=2)
    d.heartbeat("s1", [leases["lost"]])  # releases nothing; a0 and flaky already reported
    d.msg("s1", credit=wpb.Credit(slots=2))
    d.submit(independent(2), "wf-2")
    d.cancel("wf-2")
    assert snapshot(replayed(d)) == snapshot(d.st)


def test_replayed_leases_get_a_fresh_ttl_and_are_readopted() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    d.advance(4.0)  # 1 s of TTL left when the coordinator "crashes"
    st = replayed(d, advance=30.0)  # restarted much later
    w = st.workers["w1"]
    assert not w.connected and lease.lease_id in w.leases
    d2 = Driver()
    d2.st, d2.mono = st, d.mono + 30.0
    d2.advance(4.0)
    assert d2.state("a0") == "ACTION_STATE_LEASED"  # not expired: the TTL restarted
    out = d2.hello(
        "s9",
        "w1",
        slots=1,
        running=[wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=1, slots=1)],
    )
    welcome = out.sends["s9"][0].welcome
    assert [r.lease_id for r in welcome.adopted] == [lease.lease_id]
    d2.finish("s9", lease, outputs='{"ok": true}')
    assert d2.state("a0") == "ACTION_STATE_SUCCEEDED"


def test_unreported_lease_expires_one_ttl_after_restart() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    grants(d.submit(independent(1)))
    d2 = Driver()
    d2.st, d2.mono = replayed(d), d.mono
    d2.advance(5.5)
    assert d2.state("a0") == "ACTION_STATE_READY"
    assert d2.st.workflows["wf-1"].actions["a0"].token == 1  # the next lease will be 2


def test_duplicate_result_after_restart_gets_the_same_ack() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(1)))
    d.finish("s1", lease)
    d2 = Driver()
    d2.st, d2.mono = replayed(d), d.mono
    d2.hello("s2", "w1", slots=1)
    out = d2.finish("s2", lease)
    assert out.sends["s2"][0].ack.results[0].status.code == 0
    assert [r.type for r in out.records] == []


def test_replay_refuses_a_journal_out_of_order() -> None:
    d = Driver()
    d.submit(independent(1))
    d.submit(independent(1), "wf-2")
    events = list(reversed(d.records))
    fresh = SchedulerState(CONFIG)
    try:
        replay(fresh, events, Instant(0, 0))
    except ValueError as e:
        assert "out of order" in str(e)
    else:
        raise AssertionError("replay accepted a journal out of order")


def test_new_sequence_continues_after_replay() -> None:
    d = Driver()
    d.submit(independent(1))
    st = replayed(d)
    assert st.sequence == d.records[-1].sequence
    assert st.workflows["wf-1"].state == pb.WORKFLOW_STATE_RUNNING
