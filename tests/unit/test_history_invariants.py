"""The system tests' history checkers (tests/system/invariants.py) catch what they claim to."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from plait.v1 import workflow_pb2 as wf
from tests.system import invariants

E = wf.EventType
SPEC = wf.WorkflowSpec(
    name="ab",
    actions=[wf.ActionSpec(id="a", handler="h"), wf.ActionSpec(id="b", handler="h", needs=["a"])],
)


def ev(event_type: int, action: str = "", token: int = 0, state: int = 0) -> wf.HistoryEvent:
    return wf.HistoryEvent(
        type=event_type, action_id=action, fencing_token=token, action_state=state
    )


def good() -> list[wf.HistoryEvent]:
    events = [
        ev(E.EVENT_TYPE_WORKFLOW_SUBMITTED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "a", 1, wf.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_LEASE_LOST, "a", 1, wf.ACTION_STATE_READY),
        ev(E.EVENT_TYPE_ACTION_LEASED, "a", 2, wf.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "a", 2, wf.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "b", 1, wf.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "b", 1, wf.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_WORKFLOW_FINISHED),
        ev(E.EVENT_TYPE_STALE_RESULT_REFUSED, "a", 1, wf.ACTION_STATE_SUCCEEDED),
    ]
    for i, e in enumerate(events, start=1):
        e.sequence = i
        e.hlc.physical_ms, e.hlc.logical = 1_700_000_000_000 + i // 2, i % 2
        e.worker_id = "w1" if e.action_id else ""
    return events


def test_a_good_history_passes() -> None:
    invariants.check_history(good(), SPEC)


def _swap(events: list[wf.HistoryEvent], i: int, j: int) -> None:
    # Swaps what happened, keeping positions (sequence, hlc) in place.
    a, b = wf.HistoryEvent(), wf.HistoryEvent()
    a.CopyFrom(events[i])
    b.CopyFrom(events[j])
    for src, dst in ((b, events[i]), (a, events[j])):
        seq, hlc = dst.sequence, (dst.hlc.physical_ms, dst.hlc.logical)
        dst.CopyFrom(src)
        dst.sequence, (dst.hlc.physical_ms, dst.hlc.logical) = seq, hlc


def finished_twice(h: list[wf.HistoryEvent]) -> None:
    h[6].action_id = "a"
    h[6].fencing_token = 2


def stale_commit(h: list[wf.HistoryEvent]) -> None:
    h[4].fencing_token = 1


def sequence_repeats(h: list[wf.HistoryEvent]) -> None:
    h[3].sequence = h[2].sequence


def hlc_goes_back(h: list[wf.HistoryEvent]) -> None:
    h[5].hlc.physical_ms -= 10


def two_live_leases(h: list[wf.HistoryEvent]) -> None:
    h[2].type = E.EVENT_TYPE_ACTION_STARTED


def b_leased_before_a_finished(h: list[wf.HistoryEvent]) -> None:
    _swap(h, 4, 5)


def ready_after_terminal(h: list[wf.HistoryEvent]) -> None:
    h.append(ev(E.EVENT_TYPE_ACTION_READY, "b", 1, wf.ACTION_STATE_READY))
    h[-1].sequence, h[-1].hlc.physical_ms = 99, 1_800_000_000_000


@pytest.mark.parametrize(
    ("breaks", "invariant"),
    [
        (finished_twice, "I1"),
        (stale_commit, "I2"),
        (sequence_repeats, "I8"),
        (hlc_goes_back, "I8"),
        (two_live_leases, "I5"),
        (b_leased_before_a_finished, "I4"),
        (ready_after_terminal, "I6"),
    ],
)
def test_each_broken_history_is_caught(
    breaks: Callable[[list[wf.HistoryEvent]], None], invariant: str
) -> None:
    history = good()
    breaks(history)

    with pytest.raises(AssertionError, match=invariant):
        invariants.check_history(history, SPEC)


# ----- map children and partial joins ------------------------------------------------------------

MAP_SPEC = wf.WorkflowSpec(
    name="map",
    actions=[
        wf.ActionSpec(id="list", handler="h"),
        wf.ActionSpec(id="m", handler="h", needs=["list"], map=wf.MapSpec(over="list.xs")),
        wf.ActionSpec(id="x", handler="h"),
        wf.ActionSpec(
            id="j", handler="h", needs=["m", "x"], join=wf.JoinPolicy(kind=wf.JOIN_KIND_ANY)
        ),
    ],
)


def map_history() -> list[wf.HistoryEvent]:
    """list -> m (two children) -> j, an any-join leased before its other need x finished."""
    S = wf.ActionState
    events = [
        ev(E.EVENT_TYPE_WORKFLOW_SUBMITTED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "list", 1, S.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "x", 1, S.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "list", 1, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_MAPPED, "m", 0, S.ACTION_STATE_RUNNING),
        ev(E.EVENT_TYPE_ACTION_LEASED, "m.0", 1, S.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "m.1", 1, S.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "m.0", 1, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "m.1", 1, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "m", 0, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_LEASED, "j", 1, S.ACTION_STATE_LEASED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "x", 1, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_ACTION_FINISHED, "j", 1, S.ACTION_STATE_SUCCEEDED),
        ev(E.EVENT_TYPE_WORKFLOW_FINISHED),
    ]
    events[4].outputs_json = '["a", "b"]'
    events[9].outputs_json = '{"items": [{}, {}]}'
    for i, e in enumerate(events, start=1):
        e.sequence = i
        e.hlc.physical_ms, e.hlc.logical = 1_700_000_000_000 + i, 0
        e.worker_id = "w1" if e.type == E.EVENT_TYPE_ACTION_LEASED else ""
    return events


def test_a_good_map_history_passes() -> None:
    history = map_history()
    invariants.check_history(history, MAP_SPEC)
    expanded = invariants.expand_maps(history, MAP_SPEC)
    assert [a.id for a in expanded.actions][-2:] == ["m.0", "m.1"]


def child_before_map(h: list[wf.HistoryEvent]) -> None:
    _swap(h, 4, 5)


def map_done_before_child(h: list[wf.HistoryEvent]) -> None:
    _swap(h, 8, 9)


def map_leased(h: list[wf.HistoryEvent]) -> None:
    h[5].action_id = "m"


def any_join_too_early(h: list[wf.HistoryEvent]) -> None:
    _swap(h, 9, 10)  # j leased before m (its one succeeded need) finished


def missing_child(h: list[wf.HistoryEvent]) -> None:
    h[4].outputs_json = '["a", "b", "c"]'


@pytest.mark.parametrize(
    "corrupt",
    [child_before_map, map_done_before_child, map_leased, any_join_too_early, missing_child],
)
def test_map_and_join_violations_are_caught(
    corrupt: Callable[[list[wf.HistoryEvent]], None],
) -> None:
    history = map_history()
    corrupt(history)
    with pytest.raises(AssertionError):
        invariants.check_history(history, MAP_SPEC)
