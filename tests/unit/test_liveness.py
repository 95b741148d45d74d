"""Liveness both ways (coordinator.core.liveness): who may be leased new work.

The driver's config: heartbeat 1 s, lease TTL 5 s, so a proof of hearing counts for 3 s.
"""

from __future__ import annotations

from google.rpc import code_pb2

from plait.coordinator.core import liveness
from plait.coordinator.core.events import WorkerMessageReceived
from plait.coordinator.core.views import worker_info
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants, independent, replayed

E = pb


def bare_hello(d: Driver, session: str, worker_id: str, slots: int = 1, **kw: object) -> object:
    """A Hello whose Welcome never reaches the worker: no heartbeat follows it."""
    m = wpb.ConnectRequest(hello=wpb.Hello(worker_id=worker_id, slots=slots, handlers=["h"], **kw))  # type: ignore[arg-type]
    m.hlc.physical_ms = d.wall
    return d.handle(WorkerMessageReceived("w", session, m, resume_token=f"rt-{session}"))


def deaf_heartbeat(d: Driver, session: str, leases: list[wpb.Lease]) -> object:
    """A heartbeat from a worker that hears nothing: it still echoes only the Welcome."""
    d.heard[session] = 0
    return d.heartbeat(session, leases)


def test_a_session_whose_welcome_was_not_heard_is_leased_nothing() -> None:
    d = Driver()
    bare_hello(d, "s1", "w1")
    assert grants(d.submit(independent(1))) == []
    assert d.state("a0") == "ACTION_STATE_READY"
    # Its first heartbeat proves the Welcome arrived: the lease goes out at once.
    (lease,) = grants(d.heartbeat("s1", []))
    assert lease.action_id == "a0"


def test_a_deaf_session_gets_no_new_work_and_a_hearing_one_does() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (first,) = grants(d.submit(independent(1)))
    for _ in range(4):  # heartbeats keep arriving, but echo nothing newer than the Welcome
        d.advance(1.0)
        deaf_heartbeat(d, "s1", [first])
    assert not liveness.hears(d.st, d.st.workers["w1"])
    assert grants(d.submit(independent(1), "wf-2")) == []  # w1 has a free slot, yet nothing
    (lease,) = grants(d.hello("s2", "w2", slots=1))
    assert lease.workflow_id == "wf-2"
    info = worker_info(d.st, d.st.workers["w1"])
    assert info.heard_ago.ToTimedelta().total_seconds() == 4.0


def test_after_a_coordinator_pause_nothing_is_granted_before_fresh_heartbeats() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    (lease,) = grants(d.submit(independent(2)))
    d.advance(3.5)  # the coordinator was stopped: no batch for 3.5 s
    d.finish("s1", lease)
    # The messages handled first after the pause were sent before it: the slot is free, but
    # the newest proof of hearing is the ack of the hello's heartbeat, 3.5 s ago.
    assert grants(d.msg("s1", credit=wpb.Credit(slots=1))) == []
    assert grants(d.heartbeat("s1", [])) == []
    assert d.state("a1") == "ACTION_STATE_READY"
    (again,) = grants(d.heartbeat("s1", []))  # echoes an ack sent after the pause
    assert again.action_id == "a1"


def test_a_lost_lease_goes_to_another_worker_while_one_can_take_it() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    (lost,) = grants(d.submit(independent(1)))
    d.hello("s2", "w2", slots=1)  # w1 still has a free slot too
    d.hello("s2b", "w2b", slots=0)  # a worker without slots does not count
    # w1 self-fences: it reports the attempt cancelled while its lease is current.
    out = d.finish("s1", lost, outcome=wpb.ACTION_OUTCOME_CANCELLED)
    (moved,) = grants(out)
    assert moved.fencing_token == 2 and grants(out, "s2") == [moved]
    assert d.st.workflows["wf-1"].actions["a0"].lost_by == "w1"


def test_a_lost_lease_goes_back_to_its_worker_when_no_other_can_take_it() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    s = independent(1)
    d.hello_with("s2", wpb.Hello(worker_id="w2", slots=1, handlers=["other"]))
    (lost,) = grants(d.submit(s))
    d.finish("s1", lost, outcome=wpb.ACTION_OUTCOME_CANCELLED)
    (back,) = grants(d.msg("s1", credit=wpb.Credit(slots=1)), "s1")
    assert back.fencing_token == 2  # w2 cannot run handler "h": w1 gets it again


def test_a_worker_losing_leases_in_a_row_is_held_back_with_doubling_backoff() -> None:
    d = Driver()
    d.submit(independent(1))
    (lease,) = grants(d.hello("s1", "w1", slots=1))
    held_for = []
    for n in range(1, 4):
        d.finish("s1", lease, outcome=wpb.ACTION_OUTCOME_CANCELLED)  # self-fenced
        credited = grants(d.msg("s1", credit=wpb.Credit(slots=1)))
        assert d.st.streaks["w1"].losses == n
        held_for.append(liveness.held_back_for(d.st, "w1"))
        info = worker_info(d.st, d.st.workers["w1"])
        assert info.lease_loss_streak == n
        if n == 1:
            (lease,) = credited  # no other worker: it gets the action straight back
            continue
        assert credited == []
        waited, got = 0.0, []
        while not got:  # it heartbeats every 0.5 s, hearing, idle, but held back
            waited += 0.5
            got = grants(d.advance(0.5)) or grants(d.heartbeat("s1", []))
        (lease,) = got  # leased again once the hold ends
        assert held_for[-1] <= waited < held_for[-1] + 0.5
    assert held_for == [0.0, 2.0, 4.0]  # the first loss only steers the action elsewhere
    d.finish("s1", lease)  # a success ends the streak
    assert "w1" not in d.st.streaks
    assert not worker_info(d.st, d.st.workers["w1"]).HasField("held_back_for")


def test_hold_back_is_capped_at_four_ttls() -> None:
    d = Driver()
    for _ in range(20):
        liveness.lost(d.st, "w1", E.EVENT_REASON_LEASE_EXPIRED)
    assert liveness.held_back_for(d.st, "w1") == 4 * d.st.ttl


def test_losses_that_are_not_the_workers_doing_do_not_hold_it_back() -> None:
    d = Driver()
    for why in (
        E.EVENT_REASON_UNDELIVERED,
        E.EVENT_REASON_WORKER_REVOKED,
        E.EVENT_REASON_HEDGE_ENDED,
        E.EVENT_REASON_WORKER_LEFT,
    ):
        liveness.lost(d.st, "w1", why)
    assert "w1" not in d.st.streaks


def test_a_silent_session_is_closed_after_a_ttl_and_its_leases_keep_theirs() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=1)
    d.advance(2.0)
    grants(d.submit(independent(1)))  # granted 2 s after the worker's last message
    out = d.advance(2.9)
    assert out.closes == []
    out = d.advance(0.2)  # 5.1 s without a message: past the 5 s TTL
    assert [(c.session_id, c.code) for c in out.closes] == [("s1", code_pb2.UNAVAILABLE)]
    assert "no message from worker 'w1'" in out.closes[0].message
    assert "s1" not in d.st.by_session
    assert not d.st.workers["w1"].connected  # still known: it holds a lease
    assert d.state("a0") == "ACTION_STATE_LEASED"  # which lives out its TTL (granted + 5 s)
    d.advance(2.0)
    assert d.state("a0") == "ACTION_STATE_READY"


def test_after_a_restart_a_started_lease_missing_from_hello_is_not_undelivered() -> None:
    d = Driver()
    d.hello("s1", "w1", slots=2)
    started, unsent = grants(d.submit(independent(2)))
    report = wpb.LeaseReport(lease_id=started.lease_id, fencing_token=started.fencing_token)
    d.msg("s1", action_started=wpb.ActionStarted(leases=[report]))
    st = replayed(d.records, d.at())
    d.st = st  # the coordinator restarted: both leases are known only from the journal
    d.hello("s2", "w1", slots=2)  # the worker comes back holding neither
    lost = {e.action_id: e.reason for e in d.records if e.type == E.EVENT_TYPE_LEASE_LOST}
    assert lost[started.action_id] == E.EVENT_REASON_NOT_READOPTED
    assert lost[unsent.action_id] == E.EVENT_REASON_UNDELIVERED


def test_plait_workers_shows_held_back_and_heard() -> None:
    from rich.console import Console

    from plait.cli import render

    d = Driver()
    d.hello("s1", "w1", slots=1)
    for _ in range(3):
        liveness.lost(d.st, "w1", E.EVENT_REASON_LEASE_EXPIRED)
    d.advance(0.5)
    info = worker_info(d.st, d.st.workers["w1"])
    assert render.worker_state(info) == "held back 3.5s (3 leases lost in a row)"
    console = Console(width=300, record=True)
    console.print(render.workers_table([info]))
    text = console.export_text()
    assert "held back 3.5s" in text and "0.5s ago" in text  # the heard column
    d.st.streaks.clear()
    assert render.worker_state(worker_info(d.st, d.st.workers["w1"])) == "active"
