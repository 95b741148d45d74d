"""A worker dies or pauses mid-action: the action moves on, exactly one result commits.

SIGKILL: the lease expires, the action is re-leased with a higher fencing token and completes on
the other worker, and the first attempt's process died with its workerd (no orphan).
SIGSTOP past the TTL: the action commits elsewhere; once resumed, the paused worker's late
result is refused (history event + metric), and still only one result is committed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.system import invariants
from tests.system.harness import (
    EXIT_DEADLINE_S,
    Cluster,
    describe,
    python_action,
    wait_for,
    workflow,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(90),
    pytest.mark.usefixtures("workerd_available"),
]

# Each attempt checks in by writing a marker file (atomically) named after its pid; the first
# attempt of all then runs for `first_s`, every later one for `later_s`.
CHECK_IN = """
import time
marks = {marks!r}
first = True
try:
    os.close(os.open(os.path.join(marks, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    first = False
token = os.environ.get("PLAIT_FENCING_TOKEN", "")
tmp = os.path.join(marks, f".attempt-{{os.getpid()}}")
with open(tmp, "w") as f:
    json.dump({{"pid": os.getpid(), "token": token, "first": first}}, f)
os.rename(tmp, os.path.join(marks, f"attempt-{{os.getpid()}}.json"))
time.sleep({first_s} if first else {later_s})
plait_output({{"token": token, "first": first}})
"""


def check_in_action(marks: Path, first_s: float, later_s: float) -> wf.ActionSpec:
    marks.mkdir()
    code = CHECK_IN.format(marks=str(marks), first_s=first_s, later_s=later_s)
    return python_action("work", code)


def attempts(marks: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(marks.glob("attempt-*.json"))]


def first_attempt(cluster: Cluster, workflow_id: str, marks: Path) -> tuple[int, str]:
    """Waits until the first attempt runs; returns its pid and the worker holding it."""
    first = wait_for(
        "the first attempt to check in",
        lambda: next((a for a in attempts(marks) if a["first"]), None),
    )
    leased = cluster.wait_event(
        workflow_id,
        lambda e: e.type == wf.EVENT_TYPE_ACTION_LEASED and e.action_id == "work",
        "the first lease",
    )
    assert first["token"] == str(leased.fencing_token), "PLAIT_FENCING_TOKEN reaches the action"
    return int(first["pid"]), leased.worker_id


def start_two_workers(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=1, wait=False)
    cluster.add_worker("w2", slots=1, wait=False)
    cluster.wait_workers(["w1", "w2"])


def test_sigkilled_worker_action_is_re_leased_and_commits_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    start_two_workers(cluster)
    marks = tmp_path / "marks"
    spec = workflow("kill-worker", [check_in_action(marks, first_s=60, later_s=0.2)])
    workflow_id = cluster.submit(spec)
    pid, holder = first_attempt(cluster, workflow_id, marks)
    other = {"w1": "w2", "w2": "w1"}[holder]

    cluster.kill(holder)

    # Its action dies with it (parent-death signal / process group), not a TTL later.
    wait_for(
        f"attempt pid {pid} to die with {holder}",
        lambda: not procs.is_alive(pid),
        timeout=EXIT_DEADLINE_S,
    )
    status = cluster.wait_workflow(workflow_id, timeout=30)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "work")
    assert [e.worker_id for e in leases] == [holder, other], list(map(invariants.show, leases))
    assert leases[1].fencing_token > leases[0].fencing_token
    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "work")
    assert len(lost) == 1, list(map(invariants.show, lost))
    assert lost[0].sequence < leases[1].sequence
    (finished,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "work")
    assert finished.worker_id == other
    assert finished.fencing_token == leases[1].fencing_token
    assert json.loads(finished.outputs_json) == {
        "token": str(leases[1].fencing_token),
        "first": False,
    }
    (action,) = status.actions
    assert action.lease_losses == 1
    assert action.fencing_token == leases[1].fencing_token


def test_paused_worker_late_result_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    start_two_workers(cluster)
    marks = tmp_path / "marks"
    # Short enough to finish while its workerd is paused, long enough to be paused mid-run.
    spec = workflow("pause-worker", [check_in_action(marks, first_s=1.5, later_s=1.5)])
    workflow_id = cluster.submit(spec)
    _, holder = first_attempt(cluster, workflow_id, marks)
    other = {"w1": "w2", "w2": "w1"}[holder]

    cluster.stop(holder)
    try:
        # The lease (TTL 2 s) expires while the holder is paused; the other worker commits.
        status = cluster.wait_workflow(workflow_id, timeout=30)
    finally:
        cluster.cont(holder)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    # Resumed, the holder re-sends what it has for the old lease on its new stream, then
    # heartbeats: once it is heard again, that report has been handled. Which report it is
    # depends on a race inside the resumed workerd: the attempt's exit (a late SUCCEEDED
    # result, refused as superseded and journalled) or its own fence (a CANCELLED report,
    # acked and journalled nowhere: it only says the attempt stopped). Neither may commit.
    cluster.wait_heard(holder)

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "work")
    assert [e.worker_id for e in leases] == [holder, other]
    for refused in invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED, "work"):
        assert refused.worker_id == holder
        assert refused.fencing_token == leases[0].fencing_token < leases[1].fencing_token
        # A newer token committed while the action went on: a zombie's result.
        assert cluster.metric("plait_results_refused_total", reason="superseded") >= 1
    (finished,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "work")
    assert (finished.worker_id, finished.fencing_token) == (other, leases[1].fencing_token)
    assert json.loads(finished.outputs_json)["token"] == str(leases[1].fencing_token)
    # The refused result left the committed outcome alone.
    assert cluster.get(workflow_id).actions[0].outputs_json == finished.outputs_json
