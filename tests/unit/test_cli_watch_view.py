"""The live view of `plait run` and `submit --watch` (map children, stuck actions and their
reasons) and what `plait status`, `--wait` and `plait workers` print: times, durations,
outputs as JSON, connection times. Pure rendering: events and statuses in, text out."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from plait.cli import render
from plait.cli.progress import RunProgress, live_view
from plait.client import parse_action_state
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import workflow_pb2 as pb

T0 = 1_700_000_000_000
_seq = iter(range(1, 100_000))


def ev(type_: int, at_ms: int, **fields: Any) -> pb.HistoryEvent:
    e = pb.HistoryEvent(sequence=next(_seq), workflow_id="wf-1", type=type_, **fields)
    e.hlc.physical_ms = at_ms
    e.recorded_at.FromMilliseconds(at_ms)
    return e


def text_of(renderable: Any, width: int = 160) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def mapping_spec() -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="fan")
    s.actions.add(id="list", handler="load-text")
    m = s.actions.add(id="each", needs=["list"], handler="work")
    m.map.over = "list.items"
    p = s.actions.add(id="pipe", needs=["list"])
    p.pipeline.over = "list.items"
    p.pipeline.stages.add(id="fetch", handler="f")
    p.pipeline.stages.add(id="store", handler="s")
    return s


def test_submission_readies_what_needs_nothing_and_map_children_count() -> None:
    p = RunProgress(mapping_spec(), "wf-1")
    p.apply(ev(pb.EVENT_TYPE_WORKFLOW_SUBMITTED, T0))
    assert p.counts() == {"ready": 1, "pending": 2}  # not "pending 3": `list` is ready
    p.apply(
        ev(
            pb.EVENT_TYPE_ACTION_FINISHED,
            T0 + 100,
            action_id="list",
            action_state=pb.ACTION_STATE_SUCCEEDED,
        )
    )
    line = p.apply(
        ev(
            pb.EVENT_TYPE_ACTION_MAPPED,
            T0 + 200,
            action_id="each",
            action_state=pb.ACTION_STATE_RUNNING,
            outputs_json=json.dumps(["x", "y", "z"]),
        )
    )
    assert line == "[1/6] each mapped over 3 item(s)"
    p.apply(
        ev(
            pb.EVENT_TYPE_ACTION_MAPPED,
            T0 + 200,
            action_id="pipe",
            action_state=pb.ACTION_STATE_RUNNING,
            outputs_json=json.dumps(["x", "y"]),
        )
    )
    assert p.total == 3 + 3 + 2 * 2
    assert "each.2" in p.actions and "pipe.1.store" in p.actions
    assert p.counts() == {"succeeded": 1, "running": 2, "ready": 5, "pending": 2}
    assert p.running() == []  # a map runs as its children: not a row of its own
    done = ev(
        pb.EVENT_TYPE_ACTION_FINISHED,
        T0 + 900,
        action_id="each.1",
        action_state=pb.ACTION_STATE_SUCCEEDED,
        worker_id="w1",
    )
    assert p.apply(done) == "[ 2/10] each.1 succeeded on w1"
    assert "2/10" in text_of(live_view(p, T0 + 1000))


def test_stuck_actions_show_the_coordinators_reason_after_a_while() -> None:
    p = RunProgress(mapping_spec(), "wf-1", stuck_after_ms=3000)
    p.apply(ev(pb.EVENT_TYPE_WORKFLOW_SUBMITTED, T0))
    assert p.stuck(T0 + 2999) == []
    assert [a.action_id for a in p.stuck(T0 + 3000)] == ["list"]
    why = "no connected worker can run it (handler 'load-text', 1 slots)"
    view = text_of(live_view(p, T0 + 4000))
    assert "list" in view and "4s" in view  # stuck, reason not fetched yet
    p.set_reasons({"list": why})
    view = text_of(live_view(p, T0 + 4000))
    assert "0/3" in view and "ready 1" in view and why in view
    assert p.stuck_lines(T0 + 4000) == [f"[0/3] list waiting 4s: {why}"]
    assert p.stuck_lines(T0 + 6000) == []  # said once
    leased = ev(
        pb.EVENT_TYPE_ACTION_LEASED,
        T0 + 7000,
        action_id="list",
        action_state=pb.ACTION_STATE_LEASED,
        worker_id="w9",
        attempt=1,
    )
    p.apply(leased)
    assert p.stuck(T0 + 60_000) == []
    assert why not in text_of(live_view(p, T0 + 8000))


def test_a_retry_backoff_is_not_stuck_until_it_is_over() -> None:
    p = RunProgress(mapping_spec(), "wf-1", stuck_after_ms=3000)
    retry = ev(
        pb.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        T0,
        action_id="list",
        action_state=pb.ACTION_STATE_READY,
        attempt=1,
    )
    retry.backoff.FromMilliseconds(10_000)
    p.apply(retry)
    assert p.stuck(T0 + 12_000) == []
    assert [a.action_id for a in p.stuck(T0 + 13_000)] == ["list"]


def test_a_retried_workflow_runs_again_in_the_view() -> None:
    p = RunProgress(mapping_spec(), "wf-1")
    p.apply(
        ev(
            pb.EVENT_TYPE_ACTION_FINISHED,
            T0,
            action_id="list",
            action_state=pb.ACTION_STATE_FAILED,
        )
    )
    p.apply(ev(pb.EVENT_TYPE_WORKFLOW_FINISHED, T0, workflow_state=pb.WORKFLOW_STATE_FAILED))
    assert p.done and p.finished == 1
    line = p.apply(
        ev(
            pb.EVENT_TYPE_WORKFLOW_RETRIED,
            T0 + 10,
            workflow_state=pb.WORKFLOW_STATE_RUNNING,
            outputs_json='["list"]',
            message="re-running 1 actions",
        )
    )
    assert line == "workflow wf-1 retried: re-running 1 actions"
    assert not p.done and p.finished == 0


def status_with_times() -> pb.WorkflowStatus:
    st = pb.WorkflowStatus(workflow_id="wf-1", name="demo", state=pb.WORKFLOW_STATE_SUCCEEDED)
    st.submitted_at.FromMilliseconds(T0)
    st.finished_at.FromMilliseconds(T0 + 83_500)
    st.action_counts["ACTION_STATE_SUCCEEDED"] = 2
    a = st.actions.add(
        action_id="a",
        state=pb.ACTION_STATE_SUCCEEDED,
        attempt=1,
        worker_id="w1",
        outputs_json='{"n": 3, "names": ["x"]}',
    )
    a.started_at.FromMilliseconds(T0 + 1_000)
    a.finished_at.FromMilliseconds(T0 + 1_250)
    b = st.actions.add(action_id="b", state=pb.ACTION_STATE_SUCCEEDED, attempt=1)
    b.started_at.FromMilliseconds(T0 + 2_000)
    b.finished_at.FromMilliseconds(T0 + 80_000)
    return st


def test_status_shows_start_end_and_duration_of_each_action_and_the_workflow() -> None:
    st = status_with_times()
    table = text_of(render.actions_table(st.actions))
    assert "started" in table and "ended" in table
    assert "22:13:21.000" in table and "22:13:21.250" in table and "0.25s" in table
    assert "1m18s" in table
    header = "\n".join(render.workflow_header(st))
    assert "duration  1m23s" in header


def test_status_json_has_outputs_as_an_object_beside_the_string() -> None:
    doc = render.status_dict(status_with_times())
    a, b = doc["actions"]
    assert a["outputs"] == {"n": 3, "names": ["x"]}
    assert a["outputs_json"] == '{"n": 3, "names": ["x"]}'
    assert "outputs" not in b
    assert a["started_at"] == "2023-11-14T22:13:21Z"
    assert a["finished_at"] == "2023-11-14T22:13:21.250Z"


def test_workers_show_when_they_connected_and_how_long_ago() -> None:
    w = apb.WorkerInfo(worker_id="w1", slots=2)
    w.connected_at.FromMilliseconds(T0)
    assert render.connected(w, T0 + 125_000) == "2023-11-14 22:13:20Z (2m05s ago)"
    assert "(2m05s ago)" in text_of(render.workers_table([w], T0 + 125_000), width=240)
    assert render.connected(apb.WorkerInfo(worker_id="old"), T0) == ""  # never 1970


@pytest.mark.parametrize(
    ("given", "value"),
    [
        ("ready", pb.ACTION_STATE_READY),
        ("TIMED-OUT", pb.ACTION_STATE_TIMED_OUT),
        ("ACTION_STATE_FAILED", pb.ACTION_STATE_FAILED),
        (pb.ACTION_STATE_RUNNING, pb.ACTION_STATE_RUNNING),
    ],
)
def test_action_states_by_name(given: str | int, value: int) -> None:
    assert parse_action_state(given) == value


def test_an_unknown_action_state_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown action state 'done'; expected one of pending"):
        parse_action_state("done")
    with pytest.raises(ValueError):
        parse_action_state("unspecified")


def test_durations_read_well() -> None:
    assert [render.duration(s) for s in (0.314, 12.41, 185, 7620)] == [
        "0.31s",
        "12.4s",
        "3m05s",
        "2h07m",
    ]
