"""A workflow's per-state action counts are kept on every move, never recounted per call.

ListWorkflows (and every GetWorkflow page's header) reads them; polling it must not cost a walk
over every action. The Hypothesis machine (test_core_properties) checks that the kept counts
equal a recount after any interleaving and after replay; these pin the simple cases down.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NoReturn

from plait.coordinator.core import views
from plait.coordinator.core.events import Instant, RetryRequested
from plait.coordinator.core.model import WorkflowRecord
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, chain, grants, independent


class NoScan(dict[str, Any]):
    """A workflow's actions that refuse to be walked (their count is fine)."""

    def _refuse(self, *args: object) -> NoReturn:
        raise AssertionError("the header walked the workflow's actions")

    values = items = keys = __iter__ = _refuse  # type: ignore[assignment]


def names(wf: WorkflowRecord) -> dict[str, int]:
    """Recounted from the actions, as the API names them."""
    counted = Counter(a.state for a in wf.actions.values())
    return {pb.ActionState.Name(s): n for s, n in counted.items()}  # type: ignore[arg-type]


def header(st: SchedulerState, wf: WorkflowRecord) -> dict[str, int]:
    return dict(views.workflow_status(st, wf, with_actions=False).action_counts)


def test_the_header_does_not_walk_the_actions() -> None:
    d = Driver()
    d.submit(independent(50))
    d.hello("s1", "w1", slots=3)
    wf = d.st.workflows["wf-1"]
    expected = names(wf)
    assert expected == {"ACTION_STATE_READY": 47, "ACTION_STATE_LEASED": 3}
    wf.actions = NoScan(wf.actions)
    assert header(d.st, wf) == expected


def test_counts_follow_every_move_and_replay() -> None:
    d = Driver()
    d.submit(chain(3))
    wf = d.st.workflows["wf-1"]
    assert header(d.st, wf) == {"ACTION_STATE_READY": 1, "ACTION_STATE_PENDING": 2}
    (lease,) = grants(d.hello("s1", "w1", slots=1))
    assert header(d.st, wf) == names(wf)
    d.finish("s1", lease, outcome=wpb.ACTION_OUTCOME_FAILED, exit_code=1)
    assert header(d.st, wf) == {"ACTION_STATE_FAILED": 1, "ACTION_STATE_SKIPPED": 2}
    # `plait retry` moves terminal actions back to PENDING (then READY), counted as well.
    d.handle(RetryRequested("retry", "wf-1", reply=object()))
    assert header(d.st, wf) == names(wf)
    assert names(wf).get("ACTION_STATE_FAILED") is None
    fresh = SchedulerState(CONFIG)
    replay(fresh, d.records, Instant(d.mono, d.wall))
    again = fresh.workflows["wf-1"]
    assert header(fresh, again) == header(d.st, wf) == names(again)
