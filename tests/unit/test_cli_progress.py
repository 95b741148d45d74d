"""The pure progress model behind `plait run` and the CLI's renderers."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from plait.cli import render
from plait.cli.progress import RunProgress, live_view
from plait.v1 import workflow_pb2 as pb

T0 = 1_700_000_000_000


def spec() -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="demo")
    s.actions.add(id="split", exec=pb.ExecAction(argv=["x"]))
    for i in range(3):
        s.actions.add(id=f"work-{i}", needs=["split"], exec=pb.ExecAction(argv=["x"]))
    s.actions.add(id="gather", needs=[f"work-{i}" for i in range(3)], handler="g")
    return s


_seq = iter(range(1, 10_000))


def ev(type_: int, at_ms: int, **fields: Any) -> pb.HistoryEvent:
    e = pb.HistoryEvent(sequence=next(_seq), workflow_id="wf-1", type=type_, **fields)
    e.hlc.physical_ms, e.hlc.logical = at_ms, 0
    e.recorded_at.FromMilliseconds(at_ms)
    return e


def lease(action: str, at: int, worker: str = "w1", attempt: int = 1) -> list[pb.HistoryEvent]:
    return [
        ev(
            pb.EVENT_TYPE_ACTION_LEASED,
            at,
            action_id=action,
            action_state=pb.ACTION_STATE_LEASED,
            worker_id=worker,
            attempt=attempt,
            fencing_token=attempt,
        ),
        ev(
            pb.EVENT_TYPE_ACTION_STARTED,
            at + 10,
            action_id=action,
            action_state=pb.ACTION_STATE_RUNNING,
            worker_id=worker,
            attempt=attempt,
        ),
    ]


def finish(
    action: str, at: int, state: int = pb.ACTION_STATE_SUCCEEDED, **kw: Any
) -> pb.HistoryEvent:
    return ev(
        pb.EVENT_TYPE_ACTION_FINISHED,
        at,
        action_id=action,
        action_state=state,
        worker_id="w1",
        attempt=1,
        **kw,
    )


def test_counts_running_and_durations() -> None:
    p = RunProgress(spec(), "wf-1")
    assert (p.total, p.finished, p.done) == (5, 0, False)
    assert p.counts() == {"pending": 5}
    for e in lease("split", T0):
        p.apply(e)
    assert [a.action_id for a in p.running()] == ["split"]
    line = p.apply(finish("split", T0 + 510))
    assert line == "[1/5] split succeeded on w1 in 0.50s"
    assert p.finished == 1
    assert p.durations() == {"split": "0.50s"}
    for i in range(3):
        p.apply(
            ev(
                pb.EVENT_TYPE_ACTION_READY,
                T0 + 600,
                action_id=f"work-{i}",
                action_state=pb.ACTION_STATE_READY,
            )
        )
    assert p.counts() == {"succeeded": 1, "ready": 3, "pending": 1}


def test_failure_retry_skip_and_finish_lines() -> None:
    p = RunProgress(spec(), "wf-1")
    retry = ev(
        pb.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        T0,
        action_id="work-0",
        action_state=pb.ACTION_STATE_READY,
        attempt=1,
    )
    retry.error.message = "exit code 3"
    assert p.apply(retry) == "[0/5] work-0 attempt 1 failed, retrying: exit code 3"
    failed = finish("work-0", T0 + 100, pb.ACTION_STATE_FAILED, exit_code=3)
    failed.error.message = "exit code 3"
    assert p.apply(failed) == "[1/5] work-0 failed on w1 (exit 3): exit code 3"
    skipped = ev(
        pb.EVENT_TYPE_ACTION_SKIPPED,
        T0 + 200,
        action_id="gather",
        action_state=pb.ACTION_STATE_SKIPPED,
        message="need work-0 failed",
    )
    assert p.apply(skipped) == "[2/5] gather skipped: need work-0 failed"
    lost = ev(
        pb.EVENT_TYPE_LEASE_LOST,
        T0 + 250,
        action_id="work-1",
        action_state=pb.ACTION_STATE_READY,
        worker_id="w2",
        message="lease expired",
    )
    assert p.apply(lost) == "[2/5] work-1 lease lost on w2: lease expired"
    done = ev(
        pb.EVENT_TYPE_WORKFLOW_FINISHED,
        T0 + 300,
        workflow_state=pb.WORKFLOW_STATE_FAILED,
        message="failed: work-0; skipped: gather",
    )
    assert p.apply(done) == "workflow wf-1 failed: failed: work-0; skipped: gather"
    assert p.done
    assert p.reason == "failed: work-0; skipped: gather"


def test_unknown_actions_and_submit_events_are_quiet() -> None:
    p = RunProgress(spec())
    assert p.apply(ev(pb.EVENT_TYPE_WORKFLOW_SUBMITTED, T0)) is None
    assert p.workflow_id == "wf-1"
    assert p.apply(finish("ghost", T0)) is None
    assert p.last_sequence > 0


def test_live_view_renders() -> None:
    p = RunProgress(spec(), "wf-1")
    for e in lease("split", T0):
        p.apply(e)
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(live_view(p, now_ms=T0 + 1500))
    text = buf.getvalue()
    assert "demo" in text and "wf-1" in text
    assert "0/5" in text and "running 1" in text and "pending 4" in text
    assert "split" in text and "w1" in text and "1.5s" in text


def test_event_line_and_header_align() -> None:
    e = ev(
        pb.EVENT_TYPE_ACTION_FINISHED,
        T0,
        action_id="work-1",
        action_state=pb.ACTION_STATE_FAILED,
        worker_id="local-0",
        exit_code=2,
        attempt=1,
    )
    e.hlc.logical = 3
    e.error.message = "exit code 2"
    line = render.event_line(e)
    cols = line.split()
    assert cols[1] == f"{T0}.3"
    assert cols[2:6] == ["action_finished", "work-1", "failed", "local-0"]
    assert line.endswith("exit code 2; exit 2")
    assert render.EVENT_HEADER.index("TYPE") == line.index("action_finished")
    wf = ev(pb.EVENT_TYPE_WORKFLOW_FINISHED, T0, workflow_state=pb.WORKFLOW_STATE_SUCCEEDED)
    assert render.event_line(wf).split()[2:4] == ["workflow_finished", "succeeded"]


def test_actions_table_and_header() -> None:
    st = pb.WorkflowStatus(
        workflow_id="wf-1", name="demo", state=pb.WORKFLOW_STATE_FAILED, reason="failed: b"
    )
    st.submitted_at.FromMilliseconds(T0)
    st.action_counts["ACTION_STATE_FAILED"] = 1
    st.actions.add(action_id="a", state=pb.ACTION_STATE_SUCCEEDED, attempt=1, worker_id="w1")
    b = st.actions.add(
        action_id="b",
        state=pb.ACTION_STATE_FAILED,
        attempt=2,
        worker_id="w2",
        exit_code=4,
        lease_losses=1,
    )
    b.error.message = "boom"
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(
        render.actions_table(st.actions, {"a": "0.20s"}, exec_ids=frozenset({"a", "b"}))
    )
    text = buf.getvalue()
    assert "0.20s / exit 0" in text
    assert "exit 4" in text and "boom" in text and "2 (+1 lost)" in text
    header = "\n".join(render.workflow_header(st))
    assert "state     failed" in header and "reason    failed: b" in header
    assert "submitted 2023-11-14T22:13:20.000Z" in header


def test_to_dict_keeps_proto_names_and_defaults() -> None:
    d = render.to_dict(pb.ActionStatus(action_id="a"))
    assert d["action_id"] == "a"
    assert d["attempt"] == 0 and d["state"] == "ACTION_STATE_UNSPECIFIED"
    assert "error" not in d  # message fields appear only when set
