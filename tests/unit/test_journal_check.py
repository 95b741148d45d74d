"""The journal checker of the system tests catches what it claims to (and passes a real history).

A history comes from the pure core (a chain of three actions, one of them losing its lease and
running again); each test breaks it the way a faulty coordinator would and expects the checker
to name the invariant.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.system import journal_check as jc
from tests.unit.core_driver import Driver, chain, grants

Events = list[pb.HistoryEvent]


def history() -> Events:
    """a0 -> a1 -> a2 on one worker; a1's first lease expires and a second worker runs it."""
    d = Driver()
    d.submit(chain(3))
    (lease,) = grants(d.hello("s1", "w1", slots=1))
    d.finish("s1", lease)
    d.advance(0.1)
    (lease,) = grants(d.msg("s1", credit=wpb.Credit(slots=1)))
    assert (lease.action_id, lease.fencing_token) == ("a1", 1)
    report = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=1)
    d.msg("s1", action_started=wpb.ActionStarted(leases=[report]))  # started: a charged loss
    d.close("s1")
    d.advance(6)  # TTL 5 s: a1's lease is lost
    (lease,) = grants(d.hello("s2", "w2", slots=1))
    assert lease.action_id == "a1" and lease.fencing_token == 2
    d.advance(0.1)
    d.finish("s2", lease)
    d.advance(0.1)
    (lease,) = grants(d.msg("s2", credit=wpb.Credit(slots=1)))
    d.advance(0.1)
    d.finish("s2", lease)
    return [pb.HistoryEvent.FromString(e.SerializeToString()) for e in d.records]


def rows(events: Events, terms: list[int] | None = None) -> list[jc.Row]:
    """Journal rows for ``events`` as they are (columns copied from each event)."""
    return [
        jc.Row(
            e.sequence,
            e.workflow_id,
            (e.hlc.physical_ms, e.hlc.logical),
            e.type,
            e,
            terms[i] if terms else None,
        )
        for i, e in enumerate(events)
    ]


def renumbered(events: Events) -> Events:
    """The same events in this order, with sequences and HLCs rewritten to increase, so only
    the fault a test put in remains."""
    base = events[0].hlc.physical_ms
    for i, e in enumerate(events):
        e.sequence = i + 1
        e.hlc.physical_ms, e.hlc.logical = base + i, 0
    return events


def find(events: Events, type_: int, action_id: str = "", nth: int = 0) -> int:
    hits = [
        i
        for i, e in enumerate(events)
        if e.type == type_ and (not action_id or e.action_id == action_id)
    ]
    return hits[nth]


def test_a_real_history_passes() -> None:
    events = history()
    summary = jc.check_journal(rows(events))
    assert summary.workflows == summary.finished_workflows == 1
    assert summary.of_type(pb.EVENT_TYPE_LEASE_LOST) == 1
    assert [e.fencing_token for e in summary.leases[("wf-1", "a1")]] == [1, 2]
    assert summary.committed[("wf-1", "a1")].fencing_token == 2


def _second_finish(events: Events) -> Events:
    dup = pb.HistoryEvent()
    dup.CopyFrom(events[find(events, pb.EVENT_TYPE_ACTION_FINISHED, "a0")])
    events.insert(find(events, pb.EVENT_TYPE_WORKFLOW_FINISHED), dup)
    return events


def _hlc_backwards(events: Events) -> Events:
    events[5].hlc.physical_ms = events[4].hlc.physical_ms - 1
    return events


def _stale_commit(events: Events) -> Events:
    events[find(events, pb.EVENT_TYPE_ACTION_FINISHED, "a1")].fencing_token = 1
    return events


def _two_live_leases(events: Events) -> Events:
    del events[find(events, pb.EVENT_TYPE_LEASE_LOST)]
    return events


def _leased_before_need_finished(events: Events) -> Events:
    leased = events.pop(find(events, pb.EVENT_TYPE_ACTION_LEASED, "a1"))
    events.insert(find(events, pb.EVENT_TYPE_ACTION_FINISHED, "a0"), leased)
    return events


def _wrong_state(events: Events) -> Events:
    events[find(events, pb.EVENT_TYPE_ACTION_LEASED, "a2")].action_state = pb.ACTION_STATE_RUNNING
    return events


def _never_finished(events: Events) -> Events:
    del events[find(events, pb.EVENT_TYPE_WORKFLOW_FINISHED)]
    return events


@pytest.mark.parametrize(
    ("fault", "invariant"),
    [
        (_second_finish, "I1"),
        (_stale_commit, "I2"),
        (_two_live_leases, "I5"),
        (_leased_before_need_finished, "I4"),
        (_wrong_state, "I6"),
        (_never_finished, "I10"),
    ],
)
def test_each_fault_is_named(fault: Callable[[Events], Events], invariant: str) -> None:
    with pytest.raises(AssertionError, match=rf"^{invariant} "):
        jc.check_journal(rows(renumbered(fault(history()))))


def test_hlc_going_backwards_is_caught() -> None:
    with pytest.raises(AssertionError, match="I8 HLC"):
        jc.check_journal(rows(_hlc_backwards(history())))


def test_attempts_beyond_the_lease_loss_budget_are_caught() -> None:
    with pytest.raises(AssertionError, match=r"^I7 a1: 2 attempts > 1"):
        jc.check_journal(rows(history()), lease_loss_budget=0)


def test_a_deposed_leaders_row_is_caught() -> None:
    events = history()
    terms = [1] * 5 + [2] * 5 + [1] + [2] * (len(events) - 11)
    with pytest.raises(AssertionError, match="deposed leader's write: term 1"):
        jc.check_journal(rows(events, terms))


def test_columns_must_agree_with_the_payload() -> None:
    bad = rows(history())
    bad[3].workflow_id = "wf-other"
    with pytest.raises(AssertionError, match="disagree"):
        jc.check_journal(bad)


def test_a_lost_completed_attempt_is_caught() -> None:
    summary = jc.check_journal(rows(history()))
    jc.check_completed_attempts_committed(summary, [("wf-1", "a0", 1), ("wf-1", "a2", 1)])
    with pytest.raises(AssertionError, match="I3 1 completed attempt"):
        jc.check_completed_attempts_committed(summary, [("wf-1", "a1", 1)])
