"""The parallel patterns of docs/workflows.md, end to end on real processes: the examples
and the flow shapes.

1. Every pattern example under examples/ runs with ``plait run`` (``resources.yaml`` on a
   cluster with a GPU worker, through ``plait submit --wait``) and ends as its comment says.
2. Joins ``any`` / ``at_least`` and ``map``, checked through what the actions saw and
   recorded (their outputs: start and end times, pid, item, the inputs they were given) and
   through the history.
3. A map + quorum workflow survives a SIGKILL of the coordinator while map children run, and
   the journal satisfies the invariants of :mod:`tests.system.journal_check`; speculation
   hedges a straggler; ``plait retry`` re-runs only what failed.

Limits, resources, semaphores, timeouts and priorities are in
:mod:`tests.system.test_patterns_limits`; the probe script and helpers in
:mod:`tests.system.patterns_support`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import plait
from plait.v1 import workflow_pb2 as wf
from tests.system import invariants, journal_check
from tests.system.harness import Cluster, describe
from tests.system.patterns_support import (
    PARTIALLY_SUCCEEDED,
    SUCCEEDED_NAME,
    actions_of,
    assert_gone,
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
    ("typed_retry", ("--handlers", "examples.handlers:worker"), 0, "WORKFLOW_STATE_SUCCEEDED"),
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
    elif flow == "typed_retry":
        assert out_of(actions["fetch"])["attempt"] == 3  # two typed failures were retried
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
