"""The parallel patterns of docs/workflows.md, end to end on real processes: the limits.

One test per feature, checked through what the actions saw and recorded and through the
history: semaphores, ``max_parallel``, resources and ``queue_timeout``,
``heartbeat_timeout``, ``deadline``, ``fail_fast`` and priorities. The probe script and
helpers are in :mod:`tests.system.patterns_support`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import plait
from plait.v1 import workflow_pb2 as wf
from tests.system import invariants
from tests.system.harness import Cluster, describe
from tests.system.patterns_support import (
    actions_of,
    assert_gone,
    event_ms,
    max_overlap,
    outputs,
    pid_file,
    pid_of,
    plait_cli,
    probe,
    spans,
    start,
    wait_done,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("workerd_available"),
]

HEARTBEAT_HANDLERS = '''
"""Handlers for the heartbeat_timeout test."""
import time

import plait

worker = plait.Worker()


@worker.action("beat")
def beat(ctx):
    """Reports progress every 100 ms for 4 s (longer than two heartbeat timeouts)."""
    deadline = time.monotonic() + 4.0
    beats = 0
    while time.monotonic() < deadline:
        ctx.heartbeat({"beats": beats})
        beats += 1
        time.sleep(0.1)
    return {"beats": beats}


@worker.action("silent")
def silent(ctx):
    """Works 6 s without a word."""
    time.sleep(6.0)
    return {"slept": 6.0}
'''

# ----- one limit at a time ---------------------------------------------------------------------


def test_semaphore_shared_by_two_workflows(cluster: Cluster, tmp_path: Path) -> None:
    """A semaphore of capacity 1 named by two workflows submitted together: their critical
    sections never overlap, though slots would allow it."""
    start(cluster, "w1", slots=8)
    run = probe(tmp_path)
    ids = []
    for name in ("one", "two"):
        flow = plait.Workflow(name)
        for k in range(2):
            flow.exec(f"crit-{k}", run, input={"sleep": 0.2}, semaphores=["crit"])
        flow.exec("free", run, input={"sleep": 0.2})
        ids.append(cluster.submit(flow.to_spec()))

    statuses = [wait_done(cluster, i) for i in ids]
    critical = []
    for status in statuses:
        assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
        critical += spans(status, ["crit-0", "crit-1"])
    assert max_overlap(critical) == 1, f"critical sections overlap: {sorted(critical)}"


def test_workflow_max_parallel(cluster: Cluster, tmp_path: Path) -> None:
    start(cluster, "w1", slots=8)
    run = probe(tmp_path)
    flow = plait.Workflow("capped", max_parallel=2)
    ids = [f"n-{i}" for i in range(6)]
    for action_id in ids:
        flow.exec(action_id, run, input={"sleep": 0.2})
    workflow_id = cluster.submit(flow.to_spec())
    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    peak = max_overlap(spans(status, ids))
    assert peak == 2, f"{peak} actions of a max_parallel 2 workflow ran at once (8 slots free)"


def test_resources_cap_concurrency(cluster: Cluster, tmp_path: Path) -> None:
    """Four actions needing gpu: 1 on one worker with gpu=2 and 8 slots: two at a time."""
    start(cluster, "w1", slots=8, extra_args=["--resource", "gpu=2"])
    run = probe(tmp_path)
    flow = plait.Workflow("gpus")
    ids = [f"train-{i}" for i in range(4)]
    for action_id in ids:
        flow.exec(action_id, run, input={"sleep": 0.3}, resources={"gpu": 1})
    workflow_id = cluster.submit(flow.to_spec())
    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    peak = max_overlap(spans(status, ids))
    assert peak == 2, f"{peak} actions needing a GPU ran at once on a worker with 2 (8 slots)"


def test_unrunnable_action_queue_timeout(cluster: Cluster, tmp_path: Path) -> None:
    """gpu: 1 and no worker has one: READY with a reason (shown by `plait status`), then
    TIMED_OUT after its queue_timeout, the reason saying why."""
    start(cluster, "w1", slots=2)
    flow = plait.Workflow("no-gpu")
    flow.exec("train", probe(tmp_path), resources={"gpu": 1}, queue_timeout="2s")
    workflow_id = cluster.submit(flow.to_spec())

    shown = plait_cli("status", workflow_id, "-o", "json", coordinator=cluster.grpc_target)
    assert shown.returncode == 0, shown.stderr
    waiting = actions_of_json(json.loads(shown.stdout))["train"]
    assert waiting["state"] == "ACTION_STATE_READY", waiting
    assert "no connected worker can run it" in waiting["reason"], waiting
    table = plait_cli("status", workflow_id, coordinator=cluster.grpc_target)
    assert "no connected worker can run it" in table.stdout, table.stdout

    status = wait_done(cluster, workflow_id, timeout=15)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    train = actions_of(status)["train"]
    assert train.state == wf.ACTION_STATE_TIMED_OUT, train
    assert "no connected worker can run it" in train.reason, train.reason
    assert train.attempt == 0, "it never ran"
    events = cluster.history(workflow_id)
    waited = event_ms(events, wf.EVENT_TYPE_ACTION_FINISHED, "train") - event_ms(
        events, wf.EVENT_TYPE_WORKFLOW_SUBMITTED
    )
    assert 1900 <= waited <= 4000, f"queue_timeout 2s fired after {waited} ms"


def actions_of_json(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["action_id"]: a for a in status["actions"]}


def test_unrunnable_reason_names_the_missing_resource(cluster: Cluster, tmp_path: Path) -> None:
    """docs/workflows.md, resources: it "waits in READY with a reason saying what it lacks"."""
    start(cluster, "w1", slots=2)
    flow = plait.Workflow("no-gpu")
    flow.exec("train", probe(tmp_path), resources={"gpu": 1}, queue_timeout="1s")
    workflow_id = cluster.submit(flow.to_spec())
    reason = actions_of(cluster.get(workflow_id))["train"].reason
    status = wait_done(cluster, workflow_id, timeout=15)
    assert "gpu" in reason, f"the waiting reason does not name the missing gpu: {reason!r}"
    assert "gpu" in actions_of(status)["train"].reason


def test_heartbeat_timeout(cluster: Cluster, tmp_path: Path) -> None:
    """heartbeat_timeout 1.5 s: a handler reporting progress every 100 ms for 4 s succeeds;
    one silent for 6 s times out about 1.5 s after it started.

    The timeout is three times the worker's progress throttle (one report per 500 ms), so a
    loaded machine delaying a report by a few hundred milliseconds does not end the busy one;
    the silent one must end well before its 6 s are up, which only the timeout can do.
    """
    handlers = tmp_path / "beats.py"
    handlers.write_text(HEARTBEAT_HANDLERS)
    start(cluster, "w1", slots=4, handlers=[str(handlers)])
    flow = plait.Workflow("heartbeats")
    for name in ("beat", "silent"):
        flow.handler(name, name, heartbeat_timeout="1500ms", timeout="20s")
    workflow_id = cluster.submit(flow.to_spec())

    status = wait_done(cluster, workflow_id)
    got = actions_of(status)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    assert outputs(got["beat"])["beats"] >= 10  # it ran past two timeouts' worth, reporting
    assert got["silent"].state == wf.ACTION_STATE_TIMED_OUT, got["silent"]
    assert "heartbeat" in got["silent"].reason + got["silent"].error.message, got["silent"]
    events = cluster.history(workflow_id)
    silent_for = event_ms(events, wf.EVENT_TYPE_ACTION_FINISHED, "silent") - event_ms(
        events, wf.EVENT_TYPE_ACTION_LEASED, "silent"
    )
    assert 1400 <= silent_for < 5000, f"silent timed out after {silent_for} ms, not ~1500"


def test_deadline_fails_the_workflow_and_kills_the_action(cluster: Cluster, tmp_path: Path) -> None:
    start(cluster, "w1", slots=2)
    pids = tmp_path / "pids"
    pids.mkdir()
    flow = plait.Workflow("late", deadline="2s")
    flow.exec("long", probe(tmp_path), input={"pid_dir": str(pids), "sleep": 10})
    flow.exec("after", probe(tmp_path), needs=["long"])
    workflow_id = cluster.submit(flow.to_spec())
    pid = pid_of(pids, "long")

    status = wait_done(cluster, workflow_id, timeout=15)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    assert "deadline" in status.reason, status.reason
    assert_gone([pid], "the action past the deadline")
    got = actions_of(status)
    assert got["long"].state == wf.ACTION_STATE_CANCELLED, got["long"]
    assert got["after"].state in (wf.ACTION_STATE_SKIPPED, wf.ACTION_STATE_CANCELLED)
    events = cluster.history(workflow_id)
    took = event_ms(events, wf.EVENT_TYPE_WORKFLOW_FINISHED) - event_ms(
        events, wf.EVENT_TYPE_WORKFLOW_SUBMITTED
    )
    assert 1900 <= took <= 4000, f"deadline 2s ended the workflow after {took} ms"
    invariants.check_history(events, flow.to_spec(), all_finished=False)


def test_fail_fast_cancels_the_running_sibling(cluster: Cluster, tmp_path: Path) -> None:
    start(cluster, "w1", slots=4)
    pids = tmp_path / "pids"
    pids.mkdir()
    run = probe(tmp_path)
    flow = plait.Workflow("ff", fail_fast=True)
    flow.exec("slow", run, input={"pid_dir": str(pids), "sleep": 30})
    flow.exec("broken", run, input={"wait_files": [pid_file(pids, "slow")], "exit": 1})
    flow.exec("report", run, needs=["slow", "broken"])
    workflow_id = cluster.submit(flow.to_spec())
    pid = pid_of(pids, "slow")

    status = wait_done(cluster, workflow_id, timeout=15)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    assert status.reason.startswith("fail_fast: broken FAILED"), status.reason
    assert_gone([pid], "the running sibling")
    got = actions_of(status)
    assert got["slow"].state == wf.ACTION_STATE_CANCELLED, got["slow"]
    assert got["report"].state == wf.ACTION_STATE_SKIPPED, got["report"]
    events = cluster.history(workflow_id)
    after_failure = event_ms(events, wf.EVENT_TYPE_WORKFLOW_FINISHED) - event_ms(
        events, wf.EVENT_TYPE_ACTION_FINISHED, "broken"
    )
    assert after_failure <= 1000, f"the workflow ended {after_failure} ms after the failure"
    invariants.check_history(events, flow.to_spec(), all_finished=False)


def test_priority_orders_the_queue(cluster: Cluster, tmp_path: Path) -> None:
    """One slot, busy: a low- then a high-priority workflow wait; the high one goes first."""
    start(cluster, "w1", slots=1)
    run = probe(tmp_path)
    release = tmp_path / "release"
    blocker = plait.Workflow("blocker")
    blocker.exec("hold", run, input={"wait_files": [str(release)]})
    blocker_id = cluster.submit(blocker.to_spec())
    cluster.wait_event(
        blocker_id, lambda e: e.type == wf.EVENT_TYPE_ACTION_STARTED, "the blocker to start"
    )
    ids = {}
    for name, priority in (("low", -10), ("high", 10)):
        flow = plait.Workflow(name, priority=priority)
        flow.exec("job", run)
        ids[name] = cluster.submit(flow.to_spec())
    release.touch()

    for workflow_id in (blocker_id, *ids.values()):
        status = wait_done(cluster, workflow_id)
        assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    leased = {
        name: event_ms(cluster.history(i), wf.EVENT_TYPE_ACTION_LEASED, "job")
        for name, i in ids.items()
    }
    first = {
        name: invariants.of_type(cluster.history(i), wf.EVENT_TYPE_ACTION_LEASED, "job")[0]
        for name, i in ids.items()
    }
    assert first["high"].sequence < first["low"].sequence, f"leased at {leased}"
