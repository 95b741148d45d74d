"""Test support (system tier) for the pattern tests: the probe exec action and helpers.

The exec actions are one small script (:data:`PROBE`) steered by its ``input``; overlap is
measured from the wall-clock start and end each attempt records (one machine, one clock).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.system.harness import ROOT, Cluster, describe, wait_for

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
