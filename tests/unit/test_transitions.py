"""The transition table, exhaustively: every pair of states is either in the table or raises."""

from __future__ import annotations

import itertools

import pytest

from plait.coordinator.core import transitions as t
from plait.v1 import workflow_pb2 as pb

STATES = [v for k, v in pb.ActionState.items() if v != pb.ACTION_STATE_UNSPECIFIED]


@pytest.mark.parametrize(("old", "new"), list(itertools.product(STATES, STATES)))
def test_every_pair_is_allowed_exactly_when_listed(old: int, new: int) -> None:
    if (old, new) in t.TRANSITIONS:
        t.check_transition(old, new, "wf/a")
    else:
        with pytest.raises(t.IllegalTransitionError, match="illegal transition"):
            t.check_transition(old, new, "wf/a")


def test_nothing_leaves_a_terminal_state_but_a_workflow_retry() -> None:
    leaving = {pair for pair in t.TRANSITIONS if pair[0] in t.TERMINAL}
    assert leaving == t.RETRY_MOVES
    assert all(t.TRANSITIONS[pair].startswith("workflow retry") for pair in leaving)
    assert not [pair for pair in leaving if pair[0] == t.SUCCEEDED]  # committed outputs stay


def test_every_non_terminal_state_can_reach_a_terminal_one() -> None:
    for state in set(STATES) - t.TERMINAL:
        assert any(old == state and new in t.TERMINAL for old, new in t.TRANSITIONS), state


def test_every_transition_says_why() -> None:
    assert all(reason for reason in t.TRANSITIONS.values())
