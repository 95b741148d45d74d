"""Cancelling a workflow kills its running action's whole process tree."""

from __future__ import annotations

import json
from pathlib import Path

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

# The action starts a grandchild, reports both pids, and both sleep. With `ignore_term` both
# ignore SIGTERM, so only the SIGKILL after the kill grace can stop them.
TREE = """
import signal, subprocess, time
if {ignore_term}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
tmp = {marker!r} + ".tmp"
with open(tmp, "w") as f:
    json.dump({{"parent": os.getpid(), "child": child.pid}}, f)
os.rename(tmp, {marker!r})
time.sleep(120)
"""
# Cancellation reaches the worker over its stream; then TERM, kill grace, KILL.
KILL_DEADLINE_S = EXIT_DEADLINE_S + 0.75


@pytest.mark.parametrize("ignore_term", [False, True], ids=["term", "term-ignored"])
def test_cancel_kills_action_and_its_children(
    cluster: Cluster, tmp_path: Path, ignore_term: bool
) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=2)
    marker = tmp_path / "pids.json"
    spec = workflow(
        "cancel",
        [
            python_action("long", TREE.format(ignore_term=ignore_term, marker=str(marker))),
            python_action("after", "plait_output({})", needs=["long"]),
        ],
    )
    workflow_id = cluster.submit(spec)
    pids = wait_for(
        "the action to start its grandchild",
        lambda: marker.exists() and json.loads(marker.read_text()),
    )
    assert procs.is_alive(pids["parent"]) and procs.is_alive(pids["child"])

    cluster.cancel(workflow_id, reason="test cancels")

    wait_for(
        "the action and its grandchild to be killed",
        lambda: not procs.is_alive(pids["parent"]) and not procs.is_alive(pids["child"]),
        timeout=KILL_DEADLINE_S,
    )
    status = cluster.wait_workflow(workflow_id, timeout=20)
    assert status.state == wf.WORKFLOW_STATE_CANCELLED, describe(status)
    states = {a.action_id: a.state for a in status.actions}
    assert states["long"] == wf.ACTION_STATE_CANCELLED, status
    assert states["after"] in (wf.ACTION_STATE_CANCELLED, wf.ACTION_STATE_SKIPPED), status

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec, all_finished=False)
    assert invariants.of_type(events, wf.EVENT_TYPE_WORKFLOW_CANCEL_REQUESTED)
    done = invariants.of_type(events, wf.EVENT_TYPE_WORKFLOW_FINISHED)
    assert [e.workflow_state for e in done] == [wf.WORKFLOW_STATE_CANCELLED]
    assert not invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "after")
