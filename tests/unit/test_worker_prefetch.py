"""The worker's side of prefetch (plait.worker.attempts.AttemptBook): leases granted beyond the
free slots wait in a queue and start the moment a slot frees; never more than ``slots`` run;
queued leases are reported (heartbeats, Hello.running), handed back unrun when reclaimed or
cancelled, and a reclaim of one that already started is ignored."""

from __future__ import annotations

from typing import Any

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import workflow_pb2
from plait.worker.attempts import AttemptBook
from plait.worker.executor import AttemptResult
from plait.worker.session_config import SessionStats


class HeldExecutor:
    """Starts nothing by itself: the test ends each attempt with :meth:`end`."""

    handlers = frozenset({"h"})
    runs_exec = False

    def __init__(self) -> None:
        self.running: dict[str, Any] = {}
        self.cancelled: list[str] = []

    def start(self, lease: pb.Lease, ctx: Any) -> Any:
        self.running[lease.lease_id] = ctx
        return self

    def cancel(self, reason: str) -> None:  # the handle's
        pass

    def end(self, lease_id: str) -> None:
        self.running.pop(lease_id).report(AttemptResult(outcome=pb.ACTION_OUTCOME_SUCCEEDED))

    async def aclose(self) -> None:
        pass


def lease(n: int, slots: int = 1) -> pb.Lease:
    return pb.Lease(
        lease_id=f"wf/a{n}/1",
        workflow_id="wf",
        action_id=f"a{n}",
        fencing_token=1,
        action=workflow_pb2.ActionSpec(id=f"a{n}", handler="h", slots=slots),
    )


def book(slots: int, prefetch: int) -> tuple[AttemptBook, HeldExecutor, list[Any]]:
    ex = HeldExecutor()
    events: list[Any] = []
    b = AttemptBook(
        "w1",
        slots,
        [ex],
        clock=SystemClock(),
        hlc=HybridLogicalClock(SystemClock()),
        stats=SessionStats(),
        kill_grace=lambda: 0.25,
        on_started=lambda report: events.append(("started", report.lease_id)),
        on_finished=lambda result, freed: events.append(
            ("finished", result.lease_id, result.outcome, freed)
        ),
        flush_soon=lambda: None,
    )
    b.prefetch = prefetch
    return b, ex, events


def test_queued_leases_start_in_order_as_slots_free() -> None:
    b, ex, events = book(slots=1, prefetch=3)
    for n in range(4):
        b.take(lease(n))
    assert list(ex.running) == ["wf/a0/1"]
    assert [q.lease_id for q in b.queue] == ["wf/a1/1", "wf/a2/1", "wf/a3/1"]
    held = {r.lease_id: r.slots for r in b.held_reports()}
    assert held == {"wf/a0/1": 1, "wf/a1/1": 1, "wf/a2/1": 1, "wf/a3/1": 1}
    ex.end("wf/a0/1")
    assert list(ex.running) == ["wf/a1/1"]  # started in the same turn the slot freed
    assert events[-2:] == [
        ("finished", "wf/a0/1", pb.ACTION_OUTCOME_SUCCEEDED, 1),
        ("started", "wf/a1/1"),
    ]
    for n in (1, 2, 3):
        assert b.used <= b.slots
        ex.end(f"wf/a{n}/1")
    assert not b.queue and not ex.running and b.used == 0


def test_a_grant_beyond_slots_and_prefetch_is_an_over_grant() -> None:
    b, ex, events = book(slots=1, prefetch=1)
    b.take(lease(0))
    b.take(lease(1))
    b.take(lease(2))  # 1 running + 1 queued is all this worker takes
    assert list(ex.running) == ["wf/a0/1"] and len(b.queue) == 1
    assert b.unacked[("wf/a2/1", 1)].outcome == pb.ACTION_OUTCOME_FAILED


def test_a_reclaimed_queued_lease_is_handed_back_unrun() -> None:
    b, ex, events = book(slots=1, prefetch=2)
    for n in range(3):
        b.take(lease(n))
    assert b.hand_back("wf/a2/1", "reclaimed")
    r = b.unacked[("wf/a2/1", 1)]
    assert r.outcome == pb.ACTION_OUTCOME_CANCELLED and "not started" in r.error.message
    assert events[-1] == ("finished", "wf/a2/1", pb.ACTION_OUTCOME_CANCELLED, 1)  # slot credited
    # One that runs already is not handed back: it goes on.
    assert not b.hand_back("wf/a0/1", "reclaimed")
    assert "wf/a0/1" in ex.running
    assert [q.lease_id for q in b.queue] == ["wf/a1/1"]


def test_cancel_all_hands_back_the_queue_too() -> None:
    b, ex, _ = book(slots=1, prefetch=2)
    for n in range(3):
        b.take(lease(n))
    b.cancel_all("self-fencing")
    assert not b.queue
    assert {k[0] for k, r in b.unacked.items() if r.outcome == pb.ACTION_OUTCOME_CANCELLED} == {
        "wf/a1/1",
        "wf/a2/1",
    }


def test_a_wide_lease_waits_at_the_head_of_the_queue() -> None:
    b, ex, _ = book(slots=2, prefetch=2)
    b.take(lease(0))
    b.take(lease(1, slots=2))  # needs both slots: waits
    b.take(lease(2))  # behind it, in order, though one slot is free
    assert list(ex.running) == ["wf/a0/1"]
    ex.end("wf/a0/1")
    assert list(ex.running) == ["wf/a1/1"]
    ex.end("wf/a1/1")
    assert list(ex.running) == ["wf/a2/1"]


def test_a_second_grant_of_a_queued_lease_is_ignored() -> None:
    b, ex, _ = book(slots=1, prefetch=2)
    b.take(lease(0))
    b.take(lease(1))
    b.take(lease(1))
    assert [q.lease_id for q in b.queue] == ["wf/a1/1"] and b.queued_slots == 1
