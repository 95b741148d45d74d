"""The parallel patterns of docs/workflows.md, end to end on real processes.

1. Every pattern example under examples/ runs with ``plait run`` (``resources.yaml`` on a
   cluster with a GPU worker, through ``plait submit --wait``) and ends as its comment says.
2. One test per feature, checked through what the actions saw and recorded (their outputs:
   start and end times, pid, item, the inputs they were given) and through the history:
   joins ``any`` / ``at_least``, ``map``, semaphores, ``max_parallel``, resources and
   ``queue_timeout``, ``heartbeat_timeout``, ``deadline``, ``fail_fast`` and priorities.
3. A map + quorum workflow survives a SIGKILL of the coordinator while map children run, and
   the journal satisfies the invariants of :mod:`tests.system.journal_check`.

The exec actions are one small script (:data:`PROBE`) steered by its ``input``; overlap is
measured from the wall-clock start and end each attempt records (one machine, one clock).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

import plait
from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.system import invariants, journal_check
from tests.system.harness import ROOT, Cluster, describe, wait_for

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("workerd_available"),
]

# An exec action. Its input (all keys optional) steers it:
#   emit: dict merged into its outputs;       pid_dir: writes <pid_dir>/<action id>.pid at start;
#   wait_files: paths that must exist before it goes on;   sleep: seconds to sleep then;
#   await_state: [coordinator, action, state] polls the coordinator until that action of its
#   own workflow is in that state;            exit: exits with this code (after the above).
# Outputs: start/end (wall clock), pid, action id, item ($PLAIT_ITEM), argv, and its needs.
PROBE = r"""
import json, os, sys, time
t0 = time.time()
with open(os.environ["PLAIT_INPUTS_FILE"]) as f:
    inputs = json.load(f)
params = inputs.get("input") or {}
me = os.environ.get("PLAIT_ACTION_ID", "?")
if params.get("pid_dir"):
    tmp = os.path.join(params["pid_dir"], me + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(params["pid_dir"], me + ".pid"))
for path in params.get("wait_files", []):
    while not os.path.exists(path):
        time.sleep(0.02)
if params.get("await_state"):
    import plait
    target, action, state = params["await_state"]
    with plait.Client(target, timeout=10) as client:
        while True:
            status = client.get(os.environ["PLAIT_WORKFLOW_ID"])
            if any(a.action_id == action and a.state == state for a in status.actions):
                break
            time.sleep(0.05)
time.sleep(float(params.get("sleep", 0)))
if "exit" in params:
    print(f"{me} exits {params['exit']} on purpose", file=sys.stderr)
    sys.exit(int(params["exit"]))
item = os.environ.get("PLAIT_ITEM")
outputs = {
    "start": t0, "end": time.time(), "pid": os.getpid(), "action": me,
    "item": json.loads(item) if item else None, "argv": sys.argv[1:],
    "needs": inputs.get("needs", {}),
}
outputs.update(params.get("emit", {}))
with open(os.environ["PLAIT_OUTPUT"], "w") as f:
    json.dump(outputs, f)
"""

HEARTBEAT_HANDLERS = '''
"""Handlers for the heartbeat_timeout test."""
import time

import plait

worker = plait.Worker()


@worker.action("beat")
def beat(ctx):
    """Reports progress every 100 ms for 2 s."""
    deadline = time.monotonic() + 2.0
    beats = 0
    while time.monotonic() < deadline:
        ctx.heartbeat({"beats": beats})
        beats += 1
        time.sleep(0.1)
    return {"beats": beats}


@worker.action("silent")
def silent(ctx):
    """Works 2 s without a word."""
    time.sleep(2.0)
    return {"slept": 2.0}
'''

PARTIALLY_SUCCEEDED = wf.WORKFLOW_STATE_PARTIALLY_SUCCEEDED
SUCCEEDED_NAME = "ACTION_STATE_SUCCEEDED"
# How long an action process may outlive the end of its attempt: kill grace 250 ms + 1 s (I9),
# plus the trip of the cancellation to the worker.
GONE_WITHIN_S = 2.0


# ----- helpers ----------------------------------------------------------------------------------


def probe(tmp_path: Path) -> list[str]:
    """argv running :data:`PROBE` with this interpreter (which can import plait)."""
    path = tmp_path / "probe.py"
    if not path.exists():
        path.write_text(PROBE)
    return [sys.executable, str(path)]


def plait_cli(
    *argv: str, coordinator: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``plait ARGV`` as a subprocess from the repository root."""
    extra = ["--coordinator", coordinator] if coordinator else []
    return subprocess.run(
        [sys.executable, "-m", "plait.cli.main", *extra, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def wait_done(cluster: Cluster, workflow_id: str, timeout: float = 30) -> wf.WorkflowStatus:
    """The workflow's final status, once it is terminal (PARTIALLY_SUCCEEDED included)."""

    def finished() -> wf.WorkflowStatus | None:
        status = cluster.get(workflow_id)
        return status if status.state != wf.WORKFLOW_STATE_RUNNING else None

    try:
        return wait_for(f"workflow {workflow_id} to end", finished, timeout, interval=0.05)
    except AssertionError as err:
        raise AssertionError(f"{err}; {describe(cluster.get(workflow_id))}") from None


def actions_of(status: wf.WorkflowStatus) -> dict[str, wf.ActionStatus]:
    return {a.action_id: a for a in status.actions}


def outputs(action: wf.ActionStatus) -> dict[str, Any]:
    assert action.state == wf.ACTION_STATE_SUCCEEDED, action
    return dict(json.loads(action.outputs_json))


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    points = sorted(p for s, e in intervals for p in ((s, 1), (e, -1)))
    open_now = peak = 0
    for _, delta in points:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def spans(status: wf.WorkflowStatus, ids: Iterable[str]) -> list[tuple[float, float]]:
    by_id = actions_of(status)
    return [(outputs(by_id[i])["start"], outputs(by_id[i])["end"]) for i in ids]


def pid_of(pid_dir: Path, action_id: str) -> int:
    """The pid an action wrote at its start (the file appears atomically)."""
    path = pid_dir / f"{action_id}.pid"
    text = wait_for(f"{action_id}'s pid file", lambda: path.read_text() if path.exists() else None)
    return int(text)


def pid_file(pid_dir: Path, action_id: str) -> str:
    return str(pid_dir / f"{action_id}.pid")


def assert_gone(pids: Sequence[int], what: str) -> None:
    wait_for(
        f"{what} to be killed",
        lambda: not any(procs.is_alive(p) for p in pids),
        timeout=GONE_WITHIN_S,
    )


def event_ms(events: Sequence[wf.HistoryEvent], event_type: int, action_id: str = "") -> int:
    """The coordinator HLC (physical ms) of the first such event."""
    found = [e for e in events if e.type == event_type and e.action_id == action_id]
    assert found, f"no {wf.EventType.Name(event_type)} for {action_id!r}"  # type: ignore[arg-type]
    return int(found[0].hlc.physical_ms)


def start(cluster: Cluster, *workers: str, slots: int = 8, **kwargs: Any) -> None:
    cluster.start_coordinator()
    for name in workers:
        cluster.add_worker(name, slots=slots, wait=False, **kwargs)
    cluster.wait_workers(workers)


# ----- 1. every example runs ------------------------------------------------------------------


def plait_run(tmp_path: Path, flow: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    done = plait_cli(
        "run", f"examples/{flow}.yaml", *extra, "--store", f"sqlite:///{tmp_path}/plait.db",
        "-o", "json",
    )  # fmt: skip
    try:
        status = json.loads(done.stdout)
    except ValueError:
        pytest.fail(
            f"plait run {flow}: exit {done.returncode}, no JSON:\n{done.stdout}{done.stderr}"
        )
    return done.returncode, status, done.stderr


def by_id(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["action_id"]: a for a in status["actions"]}


def out_of(action: dict[str, Any]) -> dict[str, Any]:
    assert action["state"] == SUCCEEDED_NAME, action
    return dict(json.loads(action["outputs_json"]))


# flow, extra args, exit code, final state
EXAMPLES = [
    ("join_any", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    ("quorum", (), 0, "WORKFLOW_STATE_PARTIALLY_SUCCEEDED"),
    ("map_fanout", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    ("fail_fast", (), 1, "WORKFLOW_STATE_FAILED"),
    ("semaphores", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    ("retries_timeouts", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    ("pipeline", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    ("speculate", (), 0, "WORKFLOW_STATE_SUCCEEDED"),
    (
        "thumbnails",
        ("--handlers", "examples/thumbnails/handlers.py"),
        0,
        "WORKFLOW_STATE_SUCCEEDED",
    ),
]


@pytest.mark.parametrize(("flow", "extra", "code", "state"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(
    tmp_path: Path, flow: str, extra: tuple[str, ...], code: int, state: str
) -> None:
    started = time.monotonic()
    rc, status, stderr = plait_run(tmp_path, flow, *extra)
    elapsed = time.monotonic() - started
    assert (rc, status["state"]) == (code, state), f"{status.get('reason')}\n{stderr}"
    actions = by_id(status)
    if flow == "join_any":
        assert out_of(actions["pick"])["winner"] == "mirror-eu"
        for loser in ("mirror-us", "mirror-ap"):
            assert actions[loser]["state"] == "ACTION_STATE_CANCELLED", actions[loser]
    elif flow == "quorum":
        assert out_of(actions["commit"]) == {
            "acked": ["replica-a", "replica-b"],
            "lost": ["replica-c"],
        }
        assert "replica-c FAILED" in status["reason"]
    elif flow == "map_fanout":
        assert out_of(actions["total"]) == {"items": 10, "sum_of_squares": 385}
        children = [a for a in status["actions"] if a.get("parent_id") == "square"]
        assert sorted(a["action_id"] for a in children) == sorted(f"square.{i}" for i in range(10))
    elif flow == "fail_fast":
        assert status["reason"].startswith("fail_fast: broken FAILED"), status["reason"]
        assert actions["slow"]["state"] == "ACTION_STATE_CANCELLED"
        assert actions["report"]["state"] == "ACTION_STATE_SKIPPED"
        assert elapsed < 15, f"fail_fast took {elapsed:.1f}s: it waited for `slow` (30 s)"
    elif flow == "retries_timeouts":
        assert out_of(actions["flaky"])["attempt"] == 2
    elif flow == "thumbnails":
        index = out_of(actions["index"])
        assert (index["thumbnails"], index["of"], index["missing"]) == (12, 12, [])
    elif flow == "semaphores":
        assert all(a["state"] == SUCCEEDED_NAME for a in status["actions"])


def test_resources_example_on_a_gpu_worker(cluster: Cluster) -> None:
    """resources.yaml: `train` is leased only to the worker labelled accelerator=gpu that
    advertises a GPU; the plain worker gets nothing of it."""
    cluster.start_coordinator()
    cluster.add_worker("plain", slots=2, wait=False)
    cluster.add_worker(
        "gpu",
        slots=2,
        labels={"accelerator": "gpu"},
        extra_args=["--resource", "gpu=1", "--resource", "cpu=8", "--resource", "memory_mb=4096"],
        wait=False,
    )
    cluster.wait_workers(["plain", "gpu"])
    done = plait_cli(
        "submit", "examples/resources.yaml", "--wait", "-o", "json", coordinator=cluster.grpc_target
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)["workflow"]
    assert status["state"] == "WORKFLOW_STATE_SUCCEEDED", status
    actions = by_id(status)
    assert actions["train"]["worker_id"] == "gpu"
    assert out_of(actions["train"]) == {"loss": 0.1}


# ----- 2. one feature at a time -----------------------------------------------------------------


def test_any_join_cancels_the_losers_processes(cluster: Cluster, tmp_path: Path) -> None:
    """join any + cancel_remaining: the first mirror wins once the others run; their
    processes are killed, `pick` runs on the winner, the workflow SUCCEEDED."""
    start(cluster, "w1", slots=4)
    pids = tmp_path / "pids"
    pids.mkdir()
    run = probe(tmp_path)
    flow = plait.Workflow("race")
    losers = ["slow-1", "slow-2"]
    for loser in losers:
        flow.exec(loser, run, input={"pid_dir": str(pids), "sleep": 60})
    flow.exec(
        "fast",
        run,
        input={"pid_dir": str(pids), "wait_files": [pid_file(pids, x) for x in losers]},
    )
    flow.exec("pick", run, needs=["fast", *losers], join={"any": {"cancel_remaining": True}})
    workflow_id = cluster.submit(flow.to_spec())
    loser_pids = [pid_of(pids, x) for x in losers]

    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    assert_gone(loser_pids, "the losers")
    got = actions_of(status)
    for loser in losers:
        assert got[loser].state == wf.ACTION_STATE_CANCELLED, got[loser]
    saw = outputs(got["pick"])["needs"]
    assert saw["fast"]["state"] == SUCCEEDED_NAME
    assert {saw[x]["state"] for x in losers} <= {"ACTION_STATE_RUNNING", "ACTION_STATE_CANCELLED"}
    invariants.check_history(cluster.history(workflow_id), flow.to_spec(), all_finished=False)


def test_at_least_quorum_tolerates_a_failure(cluster: Cluster, tmp_path: Path) -> None:
    """at_least 2 of 3 with one replica failing: PARTIALLY_SUCCEEDED, and the join received
    every replica's outcome, the failed one's error included."""
    start(cluster, "w1", slots=4)
    run = probe(tmp_path)
    # a and b finish only once c has failed, so the join sees c's failure for sure.
    after_c = {"await_state": [cluster.grpc_target, "c", wf.ACTION_STATE_FAILED]}
    flow = plait.Workflow("quorum")
    flow.exec("a", run, input={**after_c, "emit": {"v": "a"}})
    flow.exec("b", run, input={**after_c, "emit": {"v": "b"}})
    flow.exec("c", run, input={"exit": 3})
    flow.exec("commit", run, needs=["a", "b", "c"], join={"at_least": 2})
    workflow_id = cluster.submit(flow.to_spec())

    status = wait_done(cluster, workflow_id)
    assert status.state == PARTIALLY_SUCCEEDED, describe(status)
    assert "c FAILED" in status.reason, status.reason
    saw = outputs(actions_of(status)["commit"])["needs"]
    assert set(saw) == {"a", "b", "c"}
    for replica in ("a", "b"):
        assert saw[replica]["state"] == SUCCEEDED_NAME
        assert saw[replica]["outputs"]["v"] == replica
    assert saw["c"]["state"] == "ACTION_STATE_FAILED", saw["c"]
    assert saw["c"].get("outputs", {}) == {}
    assert "exit code 3" in saw["c"].get("error", ""), saw["c"]
    invariants.check_history(cluster.history(workflow_id), flow.to_spec())


def test_map_children_see_their_item_within_max_parallel(cluster: Cluster, tmp_path: Path) -> None:
    """map over a produced list: children <id>.<index>, each with its item (argv, inputs),
    never more than the map's max_parallel at once; the gather gets them in list order."""
    start(cluster, "w1", "w2", slots=4)
    run = probe(tmp_path)
    items = [f"img-{i}" for i in range(6)]
    flow = plait.Workflow("map")
    flow.exec("plan", run, input={"emit": {"images": items}})
    flow.exec(
        "resize",
        [*run, "{{ item }}"],
        needs=["plan"],
        map={"over": "plan.images", "max_parallel": 2},
        input={"sleep": 0.3},
    )
    flow.exec("index", run, needs=["resize"])
    workflow_id = cluster.submit(flow.to_spec())

    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    got = actions_of(status)
    children = [f"resize.{i}" for i in range(len(items))]
    assert sorted(a.action_id for a in status.actions if a.parent_id == "resize") == children
    for i, child in enumerate(children):
        out = outputs(got[child])
        assert (out["item"], out["argv"], out["action"]) == (items[i], [items[i]], child), out
    peak = max_overlap(spans(status, children))
    # Eight free slots: the map's limit is what holds them to two (and they do run in pairs).
    assert peak == 2, f"{peak} children of a map with max_parallel 2 ran at once"
    gathered = outputs(got["index"])["needs"]["resize"]["outputs"]["items"]
    assert [c["item"] for c in gathered] == items

    events = cluster.history(workflow_id)
    mapped = invariants.of_type(events, wf.EVENT_TYPE_ACTION_MAPPED, "resize")
    assert len(mapped) == 1 and invariants.mapped_children(mapped[0]) == children
    # ACTION_MAPPED journals the list it read, one child per item.
    assert json.loads(mapped[0].outputs_json) == items
    invariants.check_history(events, flow.to_spec())


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
    """heartbeat_timeout 500 ms: a handler reporting progress every 100 ms for 2 s succeeds;
    one silent for 2 s times out about 500 ms after it started."""
    handlers = tmp_path / "beats.py"
    handlers.write_text(HEARTBEAT_HANDLERS)
    start(cluster, "w1", slots=4, handlers=[str(handlers)])
    flow = plait.Workflow("heartbeats")
    for name in ("beat", "silent"):
        flow.handler(name, name, heartbeat_timeout="500ms", timeout="10s")
    workflow_id = cluster.submit(flow.to_spec())

    status = wait_done(cluster, workflow_id)
    got = actions_of(status)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    assert outputs(got["beat"])["beats"] >= 15
    assert got["silent"].state == wf.ACTION_STATE_TIMED_OUT, got["silent"]
    assert "heartbeat" in got["silent"].reason + got["silent"].error.message, got["silent"]
    events = cluster.history(workflow_id)
    silent_for = event_ms(events, wf.EVENT_TYPE_ACTION_FINISHED, "silent") - event_ms(
        events, wf.EVENT_TYPE_ACTION_LEASED, "silent"
    )
    assert 400 <= silent_for < 1800, f"silent timed out after {silent_for} ms, not ~500"


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


# ----- 3. map + quorum across a coordinator crash -----------------------------------------------

RESTART_PROFILE = {"lease_ttl": "5s", "heartbeat_interval": "250ms", "kill_grace": "250ms"}


def test_map_and_quorum_survive_a_coordinator_restart(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator(**RESTART_PROFILE)
    for name in ("w1", "w2"):
        cluster.add_worker(name, slots=3, wait=False)
    cluster.wait_workers(["w1", "w2"])
    run = probe(tmp_path)
    items = list(range(6))
    flow = plait.Workflow("map-quorum")
    flow.exec("plan", run, input={"emit": {"numbers": items}})
    flow.exec(
        "square",
        [*run, "{{ item }}"],
        needs=["plan"],
        map={"over": "plan.numbers", "max_parallel": 3},
        input={"sleep": 1.0},
    )
    flow.exec("r-a", run, input={"emit": {"v": 1}})
    flow.exec("r-b", run, input={"emit": {"v": 2}})
    flow.exec("r-c", run, input={"exit": 3})
    flow.exec("commit", run, needs=["r-a", "r-b", "r-c"], join={"at_least": 2})
    flow.exec("end", run, needs=["square", "commit"])
    spec = flow.to_spec()
    workflow_id = cluster.submit(spec)
    cluster.wait_event(
        workflow_id,
        lambda e: e.type == wf.EVENT_TYPE_ACTION_STARTED and e.action_id.startswith("square."),
        "a map child to run",
    )
    cluster.kill("coordinator")
    at_crash = journal_check.read_sqlite(cluster.tmp / "plait.db")
    cluster.restart("coordinator")
    cluster.wait_workers(["w1", "w2"], timeout=15)

    status = wait_done(cluster, workflow_id, timeout=40)
    assert status.state == PARTIALLY_SUCCEEDED, describe(status)
    got = actions_of(status)
    children = [f"square.{i}" for i in items]
    for i, child in enumerate(children):
        assert outputs(got[child])["item"] == i
    assert max_overlap(spans(status, children)) <= 3
    saw = outputs(got["end"])["needs"]
    assert [c["item"] for c in saw["square"]["outputs"]["items"]] == items
    assert saw["commit"]["state"] == SUCCEEDED_NAME
    committed = outputs(got["commit"])["needs"]
    assert committed["r-c"]["state"] in ("ACTION_STATE_FAILED", "ACTION_STATE_RUNNING")

    summary = journal_check.check_sqlite_journal(cluster.tmp / "plait.db")
    assert summary.workflows == 1
    assert {a for _, a in summary.committed} >= {*children, "plan", "square", "end"}
    # The crash hit the map mid-run: a child ran then, and the map ended only afterwards.
    crash_seq = at_crash[-1].sequence
    running = {
        r.event.action_id
        for r in at_crash
        if r.event.type == wf.EVENT_TYPE_ACTION_STARTED and r.event.action_id in children
    } - {r.event.action_id for r in at_crash if r.event.type == wf.EVENT_TYPE_ACTION_FINISHED}
    assert running, "no map child was running when the coordinator was killed"
    assert summary.committed[(workflow_id, "square")].sequence > crash_seq
    # Their leases were re-adopted after the restart (5 s TTL), not lost and re-run.
    for child in running:
        leases = summary.leases[(workflow_id, child)]
        assert len(leases) == 1, f"{child} leased again: {[invariants.show(e) for e in leases]}"
        assert summary.committed[(workflow_id, child)].fencing_token == leases[0].fencing_token
    invariants.check_history(cluster.history(workflow_id), spec)


def test_speculation_hedges_a_straggler_and_fences_it(cluster: Cluster, tmp_path: Path) -> None:
    """speculate 500ms: the first attempt hangs; a hedge on the other worker commits; the
    straggler is cancelled (its process gone) and the workflow ends long before it would."""
    start(cluster, "w1", "w2", slots=2)
    script = Path(__file__).resolve().parents[2] / "examples" / "patterns" / "straggler.py"
    flow = plait.Workflow("hedge")
    flow.exec("fetch", ["python3", str(script)], speculate="500ms", timeout="2m")
    began = time.monotonic()
    workflow_id = cluster.submit(flow.to_spec())
    status = wait_done(cluster, workflow_id, timeout=20)
    assert time.monotonic() - began < 15
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    got = outputs(actions_of(status)["fetch"])
    assert got == {"attempt": 2, "token": 2}
    events = cluster.history(workflow_id)
    leased = [e for e in events if e.type == wf.EVENT_TYPE_ACTION_LEASED]
    assert [e.fencing_token for e in leased] == [1, 2]
    assert leased[0].worker_id != leased[1].worker_id
    finished = [e for e in events if e.type == wf.EVENT_TYPE_ACTION_FINISHED]
    assert [e.fencing_token for e in finished] == [2]

    def straggler_alive() -> bool:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(script) in (entry / "cmdline").read_text():
                    return True
            except OSError:
                continue
        return False

    deadline = time.monotonic() + 5
    while straggler_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not straggler_alive(), "the losing attempt's process outlived its cancellation"


def test_plait_retry_reruns_what_failed_keeping_committed_outputs(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A flaky step fails the workflow; `plait retry --wait` re-runs it (and what it skipped)
    but not the step that already succeeded."""
    start(cluster, "w1", slots=2)
    runs = tmp_path / "runs.log"
    marker = tmp_path / "fixed"
    step = (
        f'echo "$PLAIT_ACTION_ID $PLAIT_FENCING_TOKEN" >> {runs};'
        f" [ $PLAIT_ACTION_ID != flaky ] || [ -e {marker} ]"
    )
    flow = plait.Workflow("retry-me")
    flow.exec("first", step)
    flow.exec("flaky", step, needs=["first"])
    flow.exec("last", step, needs=["flaky"])
    workflow_id = cluster.submit(flow.to_spec())
    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_FAILED, describe(status)
    marker.write_text("fixed\n")
    done = plait_cli("retry", workflow_id, "--wait", "-o", "json", coordinator=cluster.grpc_target)
    assert done.returncode == 0, (done.stdout, done.stderr)
    first, _ = json.JSONDecoder().raw_decode(done.stdout)
    assert first["retried"] == ["flaky", "last"]
    status = wait_done(cluster, workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    ran = runs.read_text().split()
    assert list(zip(ran[::2], ran[1::2], strict=True)) == [
        ("first", "1"),
        ("flaky", "1"),
        ("flaky", "2"),
        ("last", "1"),
    ]
