"""Prefetch in the core: leases beyond a worker's free slots, adaptive depth, and reclaiming
leases that wait unstarted while another worker is free (coordinator/core/prefetch.py)."""

from __future__ import annotations

from plait.coordinator.core import prefetch
from plait.coordinator.core.model import Outcome
from plait.coordinator.core.state import CoreConfig
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants, independent, messages


def hello(d: Driver, session: str, worker_id: str, slots: int = 1, prefetch_: int = 8) -> Outcome:
    return d.hello_with(
        session, wpb.Hello(worker_id=worker_id, slots=slots, handlers=["h"], prefetch=prefetch_)
    )


def finish(
    d: Driver, session: str, lease: wpb.Lease, seconds: float = 0.001, **kw: object
) -> Outcome:
    res = wpb.ActionResult(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        outcome=kw.pop("outcome", wpb.ACTION_OUTCOME_SUCCEEDED),  # type: ignore[arg-type]
        outputs_json="{}",
    )
    res.duration.FromNanoseconds(int(seconds * 1e9))
    return d.msg(session, action_finished=wpb.ActionFinished(results=[res], **kw))  # type: ignore[arg-type]


def test_welcome_caps_the_workers_ask_at_the_coordinators_limit() -> None:
    d = Driver(CoreConfig(max_prefetch=4))
    out = hello(d, "s1", "w1", prefetch_=100)
    (welcome,) = messages(out, "s1", "welcome")
    assert welcome.welcome.prefetch == 4
    out = hello(d, "s2", "w2", prefetch_=2)
    assert messages(out, "s2", "welcome")[0].welcome.prefetch == 2


def test_no_prefetch_asked_means_never_beyond_the_credit() -> None:
    d = Driver()
    hello(d, "s1", "w1", prefetch_=0)
    out = d.submit(independent(10))
    assert len(grants(out, "s1")) == 1
    assert d.st.workers["w1"].free == 0


def test_depth_starts_at_the_slots_and_grows_for_short_actions() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(30))
    first = grants(out, "s1")
    assert len(first) == 2  # one free slot and a depth of min(slots, prefetch) = 1
    out = finish(d, "s1", first[0], seconds=0.001, credit=1)
    w = d.st.workers["w1"]
    assert w.depth == 8  # 1 slot x 50 ms horizon / 1 ms is far above the limit
    # The credit pays for one lease; the deeper queue for seven more: 1 + 8 held beyond.
    assert len(grants(out, "s1")) == 8
    assert w.free == -8
    assert prefetch.queued(w) == 8


def test_depth_shrinks_to_one_for_long_actions() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=4, prefetch_=8)
    out = d.submit(independent(30))
    leases = grants(out, "s1")
    assert len(leases) == 8  # 4 free + depth min(4, 8)
    finish(d, "s1", leases[0], seconds=30.0, credit=1)
    assert d.st.workers["w1"].depth == 1  # 4 x 0.05 / 30 rounds up to one


def test_free_slots_of_every_worker_come_before_any_prefetch() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    hello(d, "s2", "w2", slots=1, prefetch_=0)
    out = d.submit(independent(2))
    assert len(grants(out, "s1")) == 1 and len(grants(out, "s2")) == 1


def test_prefetch_is_spread_round_the_workers() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    hello(d, "s2", "w2", slots=1, prefetch_=8)
    out = d.submit(independent(4))
    assert len(grants(out, "s1")) == 2 and len(grants(out, "s2")) == 2


def _held_back_setup() -> tuple[Driver, list[wpb.Lease]]:
    """w1 (1 slot) holds a running lease and a queued one; w2 then connects, idle."""
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(2))
    leases = grants(out, "s1")
    assert len(leases) == 2
    d.msg("s1", action_started=wpb.ActionStarted(leases=[_report(leases[0])]))
    hello(d, "s2", "w2", slots=1, prefetch_=8)
    return d, leases


def _report(lease: wpb.Lease) -> wpb.LeaseReport:
    return wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=lease.fencing_token)


def _reclaims(out: Outcome, session: str) -> list[wpb.LeaseCancellation]:
    return [
        c
        for m in messages(out, session, "cancel_lease")
        for c in m.cancel_lease.leases
        if c.reason == wpb.CANCEL_REASON_RECLAIMED
    ]


def test_a_lease_waiting_unstarted_is_reclaimed_for_an_idle_worker() -> None:
    d, (running, queued) = _held_back_setup()
    out = d.advance(prefetch.RECLAIM_AFTER / 2)
    assert _reclaims(out, "s1") == []  # not waited long enough
    d.heartbeat("s1", [running, queued])
    d.heartbeat("s2", [])
    out = d.advance(prefetch.RECLAIM_AFTER)
    (asked,) = _reclaims(out, "s1")
    assert (asked.lease_id, asked.fencing_token) == (queued.lease_id, queued.fencing_token)
    assert _reclaims(d.advance(0.2), "s1") == []  # asked once
    # The worker hands it back unrun: the lease ends uncharged, and w2 gets the action.
    out = finish(d, "s1", queued, seconds=0, outcome=wpb.ACTION_OUTCOME_CANCELLED, credit=1)
    (again,) = grants(out, "s2")
    assert again.action_id == queued.action_id and again.fencing_token > queued.fencing_token
    a = d.st.workflows["wf-1"].actions[queued.action_id]
    assert a.lease_losses == 0
    lost = [r for r in out.records if r.type == pb.EVENT_TYPE_LEASE_LOST]
    assert [r.reason for r in lost] == [pb.EVENT_REASON_RECLAIMED]
    assert d.st.streaks.get("w1") is None  # not a fault of the worker
    (ack,) = out.sends["s1"][0].ack.results
    assert ack.status.code == 0


def test_a_reclaimed_lease_that_had_started_runs_on() -> None:
    d, (running, queued) = _held_back_setup()
    d.heartbeat("s1", [running, queued])
    d.heartbeat("s2", [])
    out = d.advance(prefetch.RECLAIM_AFTER + 0.1)
    assert len(_reclaims(out, "s1")) == 1
    # It had started as the request crossed: the worker ignores it and its result commits.
    d.msg("s1", action_started=wpb.ActionStarted(leases=[_report(queued)]))
    out = finish(d, "s1", queued)
    assert d.state(queued.action_id) == "ACTION_STATE_SUCCEEDED"
    assert not any(r.type == pb.EVENT_TYPE_LEASE_LOST for r in out.records)


def test_nothing_is_reclaimed_without_an_idle_worker_that_fits() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(3))
    leases = grants(out, "s1")
    d.msg("s1", action_started=wpb.ActionStarted(leases=[_report(leases[0])]))
    # w2 serves another handler: it could not run these.
    d.hello_with("s2", wpb.Hello(worker_id="w2", slots=1, handlers=["other"]))
    d.heartbeat("s1", leases)
    out = d.advance(prefetch.RECLAIM_AFTER + 0.1)
    assert _reclaims(out, "s1") == []


def test_started_reports_ride_with_results() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(3))
    first, second = grants(out, "s1")[:2]
    out = finish(d, "s1", first, credit=1, started=[_report(second)])
    assert d.state(first.action_id) == "ACTION_STATE_SUCCEEDED"
    assert d.state(second.action_id) == "ACTION_STATE_RUNNING"
    # In the order they happened: the result freed the slot the next one started in.
    types = [r.type for r in out.records]
    assert types.index(pb.EVENT_TYPE_ACTION_FINISHED) < types.index(pb.EVENT_TYPE_ACTION_STARTED)


def test_a_worker_that_lost_a_lease_gets_no_prefetch_for_a_while() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(20))
    first = grants(out, "s1")
    assert len(first) == 2
    # It gives its running attempt up (self-fencing): a loss. The freed slot goes to its queued
    # lease, and nothing more is queued behind it.
    out = finish(d, "s1", first[0], outcome=wpb.ACTION_OUTCOME_CANCELLED, credit=1)
    assert grants(out, "s1") == [] and d.st.workers["w1"].free == 0
    # A success: its free slot is used, still nothing queued behind it.
    out = finish(d, "s1", first[1], credit=1)
    assert len(grants(out, "s1")) == 1
    # Ten lease TTLs after the loss (the worker heartbeating all along), prefetch resumes.
    held = grants(out, "s1")
    step = d.st.config.heartbeat_interval.total_seconds()
    while d.st.no_prefetch_until:
        d.heartbeat("s1", held)
        d.advance(step)
    assert d.st.workers["w1"].free < 0


def test_a_grant_in_flight_as_the_stream_broke_is_not_charged_to_the_same_process() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(2))
    running, in_flight = grants(out, "s1")
    d.msg("s1", action_started=wpb.ActionStarted(leases=[_report(running)]))
    d.close("s1")
    # The same process (it presents its last session's token) comes back holding only the
    # running one: the other grant never reached it.
    back = wpb.Hello(
        worker_id="w1",
        slots=1,
        handlers=["h"],
        prefetch=8,
        resume_token="rt-s1",
        running=[wpb.LeaseReport(lease_id=running.lease_id, fencing_token=1, slots=1)],
    )
    out = d.hello_with("s2", back)
    (lost,) = [r for r in out.records if r.type == pb.EVENT_TYPE_LEASE_LOST]
    assert lost.action_id == in_flight.action_id and lost.reason == pb.EVENT_REASON_UNDELIVERED
    assert d.st.workflows["wf-1"].actions[in_flight.action_id].lease_losses == 0


def test_a_restarted_process_is_charged_for_what_it_does_not_list() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(2))
    _, in_flight = grants(out, "s1")
    d.close("s1")
    out = hello(d, "s2", "w1", slots=1, prefetch_=8)  # no resume token: a new process
    lost = [r for r in out.records if r.type == pb.EVENT_TYPE_LEASE_LOST]
    assert {r.reason for r in lost} == {pb.EVENT_REASON_NOT_READOPTED}
    assert d.st.workflows["wf-1"].actions[in_flight.action_id].lease_losses == 1


def test_prefetch_never_takes_a_prioritized_action() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    spec = independent(3)
    spec.priority = 5
    out = d.submit(spec)
    assert len(grants(out, "s1")) == 1  # its free slot only: the rest wait, ordered, here


def test_the_journal_checker_knows_which_losses_are_uncharged() -> None:
    from plait.coordinator.core import sessions
    from tests.system import journal_check

    assert journal_check.UNCHARGED_LOSSES == sessions.UNCHARGED
    assert journal_check.NEVER_RAN == sessions.NEVER_RAN


def test_a_lease_that_expired_before_it_started_is_not_charged() -> None:
    d = Driver()
    hello(d, "s1", "w1", slots=1, prefetch_=8)
    out = d.submit(independent(2))
    running, queued = grants(out, "s1")
    d.msg("s1", action_started=wpb.ActionStarted(leases=[_report(running)]))
    d.close("s1")
    d.advance(d.st.ttl + 1)  # both expire: the started one is charged, the queued one is not
    actions = d.st.workflows["wf-1"].actions
    assert actions[running.action_id].lease_losses == 1
    assert actions[queued.action_id].lease_losses == 0
