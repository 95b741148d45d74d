"""What GetWorkflow and ListWorkers show of times: each action's start and end, a worker's
connection time, and GetWorkflow's state filter (pure core views)."""

from __future__ import annotations

from plait.coordinator.core import views
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import RecordingDriver, chain, grants, independent, replayed

BUDGET = 4 * 1024 * 1024


def _ms(ts: object) -> int:
    return int(ts.seconds) * 1000 + int(ts.nanos) // 1_000_000  # type: ignore[attr-defined]


def test_a_workers_connection_time_is_the_wall_time_of_its_hello() -> None:
    d = RecordingDriver()
    d.wall = 1_700_000_123_456
    d.hello("s1", "w1")
    info = views.worker_info(d.st, d.st.workers["w1"])
    assert _ms(info.connected_at) == 1_700_000_123_456  # not 1970: nothing was stamped yet


def test_actions_carry_their_start_and_end_times_and_replay_keeps_them() -> None:
    d = RecordingDriver()
    d.submit(chain(2))
    leased = grants(d.hello("s1", "w1", slots=1))
    assert [lease.action.id for lease in leased] == ["a0"]
    d.advance(0.5)
    started_ms = d.wall
    d.started("s1", *leased)
    d.advance(1.25)
    finished_ms = d.wall
    out = d.done("s1", leased[0])
    wf = d.st.workflows["wf-1"]
    status = views.workflow_status(d.st, wf)
    a0, a1 = status.actions
    assert (_ms(a0.started_at), _ms(a0.finished_at)) == (started_ms, finished_ms)
    assert a1.state == pb.ACTION_STATE_LEASED
    assert grants(out) and not a1.HasField("started_at") and not a1.HasField("finished_at")

    again = replayed(d.records, d.at())
    a0_again = views.workflow_status(again, again.workflows["wf-1"]).actions[0]
    assert a0_again.started_at == a0.started_at and a0_again.finished_at == a0.finished_at


def test_a_skipped_action_has_an_end_and_no_start() -> None:
    d = RecordingDriver()
    d.submit(chain(2))
    leased = grants(d.hello("s1", "w1", slots=1))
    d.started("s1", *leased)
    d.done("s1", leased[0], outcome=wpb.ACTION_OUTCOME_FAILED)
    a1 = views.workflow_status(d.st, d.st.workflows["wf-1"]).actions[1]
    assert a1.state == pb.ACTION_STATE_SKIPPED
    assert a1.HasField("finished_at") and not a1.HasField("started_at")


def test_the_page_filter_keeps_the_states_asked_for_and_counts_them_against_page_size() -> None:
    d = RecordingDriver()
    d.submit(independent(6))
    leased = grants(d.hello("s1", "w1", slots=2))
    assert len(leased) == 2
    wf = d.st.workflows["wf-1"]
    ready = frozenset({pb.ACTION_STATE_READY})
    page, end = views.workflow_page(d.st, wf, 0, 0, BUDGET, ready)
    assert [a.state for a in page.actions] == [pb.ACTION_STATE_READY] * 4
    assert end == 6
    assert page.action_counts["ACTION_STATE_READY"] == 4  # counts stay whole-workflow
    assert page.action_counts["ACTION_STATE_LEASED"] == 2
    first, end = views.workflow_page(d.st, wf, 0, 3, BUDGET, ready)
    assert len(first.actions) == 3 and end < 6
    rest, end = views.workflow_page(d.st, wf, end, 3, BUDGET, ready)
    assert len(rest.actions) == 1 and end == 6
    ids = {a.action_id for a in first.actions} | {a.action_id for a in rest.actions}
    assert ids == {a.action_id for a in page.actions}
    # A ready action says why it waits.
    assert all(a.reason for a in page.actions)
