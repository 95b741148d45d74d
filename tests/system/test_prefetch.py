"""Prefetch with real processes: a worker's queued lease goes to a worker that frees up (no
head-of-line blocking), a one-slot worker never runs two attempts at once, and a run of many
short actions at one slot per worker completes with every action committed once."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from plait.v1 import workflow_pb2 as wf
from tests.system import invariants
from tests.system.harness import (
    Cluster,
    handler_action,
    python_action,
    wait_for,
    workflow,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

# Each attempt records when it ran, on which worker, so overlap on one worker is visible.
SPAN = """
import time
start = time.time()
time.sleep({seconds})
name = os.environ["PLAIT_ACTION_ID"] + "-" + os.environ["PLAIT_FENCING_TOKEN"]
with open(os.path.join({marks!r}, name), "w") as f:
    json.dump({{"attempt": name, "start": start, "end": time.time()}}, f)
plait_output({{}})
"""


def spans(marks: Path, history: list[wf.HistoryEvent]) -> list[dict[str, float | str]]:
    """Each attempt's record, with the worker its lease was granted to."""
    holder = {
        f"{e.action_id}-{e.fencing_token}": e.worker_id
        for e in history
        if e.type == wf.EVENT_TYPE_ACTION_LEASED
    }
    out = [json.loads(p.read_text()) for p in sorted(marks.iterdir())]
    for s in out:
        s["worker"] = holder[str(s["attempt"])]
    return out


def test_a_queued_lease_moves_to_a_worker_that_frees_up(cluster: Cluster, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=1)
    cluster.wait_heard("w1")
    spec = workflow(
        "hol",
        [python_action(f"a{i}", SPAN.format(seconds=4, marks=str(marks))) for i in range(2)],
    )
    wid = cluster.submit(spec)
    # w1 holds both: one runs, one waits in its queue (depth 1 for a one-slot worker).
    cluster.wait_event(
        wid,
        lambda e: e.type == wf.EVENT_TYPE_ACTION_STARTED,
        "the first action to start on w1",
    )
    leased = [e for e in cluster.history(wid) if e.type == wf.EVENT_TYPE_ACTION_LEASED]
    assert {e.worker_id for e in leased} == {"w1"} and len(leased) == 2
    cluster.add_worker("w2", slots=1)
    status = cluster.wait_workflow(wid, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, status.reason
    history = cluster.history(wid)
    lost = [e for e in history if e.type == wf.EVENT_TYPE_LEASE_LOST]
    assert [e.reason for e in lost] == [wf.EVENT_REASON_RECLAIMED], lost
    assert lost[0].worker_id == "w1"
    ran = spans(marks, history)
    assert sorted(str(s["worker"]) for s in ran) == ["w1", "w2"]  # each ran one, once
    first, second = sorted(ran, key=lambda s: float(s["start"]))
    # The reclaimed action started on w2 while w1's still ran: no waiting behind it.
    assert float(second["start"]) < float(first["end"]), ran
    assert cluster.metric("plait_leases_lost_total", reason="reclaimed") == 1
    invariants.check_history(history, spec)


def test_one_slot_never_runs_two_attempts_at_once(cluster: Cluster, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=1)
    code = SPAN.format(seconds=0.05, marks=str(marks))
    spec = workflow("serial", [python_action(f"a{i}", code) for i in range(12)])
    wid = cluster.submit(spec)
    status = cluster.wait_workflow(wid, timeout=90)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, status.reason
    history = cluster.history(wid)
    invariants.check_history(history, spec)
    ran = sorted(spans(marks, history), key=lambda s: float(s["start"]))
    assert len(ran) == 12
    for before, after in itertools.pairwise(ran):
        assert float(after["start"]) >= float(before["end"]), (before, after)
    depth = wait_for("w1's prefetch depth", lambda: _worker(cluster, "w1"), timeout=10)
    assert depth.prefetch_limit == 32 and depth.prefetch_depth >= 1


def _worker(cluster: Cluster, name: str):  # type: ignore[no-untyped-def]
    from plait.v1 import admin_service_pb2 as adm

    for w in cluster.admin.ListWorkers(adm.ListWorkersRequest(), timeout=10).workers:
        if w.worker_id == name:
            return w
    return None


def test_many_short_actions_at_one_slot_commit_once_each(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for name in ("w1", "w2"):
        cluster.add_worker(
            name, slots=1, handlers=["tests.bench.noop_handlers:worker"], extra_args=["--no-exec"]
        )
    n = 2000
    actions = [handler_action(f"n{i}", "noop") for i in range(n)]
    actions.append(handler_action("join", "noop", needs=[f"n{i}" for i in range(n)]))
    spec = workflow("fan", actions)
    wid = cluster.submit(spec)
    status = cluster.wait_workflow(wid, timeout=90)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, status.reason
    history = cluster.history(wid)
    invariants.check_history(history, spec)
    finished = [e for e in history if e.type == wf.EVENT_TYPE_ACTION_FINISHED]
    assert len(finished) == n + 1
    # Both workers took queued leases (granted beyond their one free slot).
    assert cluster.metric("plait_worker_prefetch_depth", worker="w1") >= 1
