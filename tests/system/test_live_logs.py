"""Live logs end to end: a real coordinator, a real workerd, exec actions, and `plait logs -f`.

One cluster for the module. The first test is the one a user sees: an action prints a line,
waits for a file, prints another; `plait logs -f` shows the first line while the action still
runs, then the second, then exits 0. The second floods stdout and checks that what is streamed
is bounded (the worker's rate limit, the coordinator's window) while the attempt still runs at
pipe speed.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.v1 import workflow_pb2 as wf
from tests.system.harness import ROOT, Cluster, command_action, wait_for, workflow

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

PLAIT = [sys.executable, "-m", "plait.cli.main"]
DEADLINE = 30.0  # generous: CI is a loaded 2-core machine


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("live-logs"))
    try:
        c.start_coordinator()
        c.add_worker("live-w1", slots=2)
        yield c
    finally:
        c.close()


class Follower:
    """`plait logs -f` as a subprocess; its stdout lines arrive on a queue as they are printed."""

    def __init__(self, cluster: Cluster, workflow_id: str, action_id: str, *extra: str) -> None:
        argv = [*PLAIT, "logs", "-f", workflow_id, action_id, *extra]
        self.proc = subprocess.Popen(
            [*argv, "--coordinator", cluster.grpc_target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, timeout: float = DEADLINE) -> bytes:
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"`plait logs -f` ended early: {self.stderr()}")
        return line

    def stderr(self) -> str:
        self.proc.wait(DEADLINE)
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def rest(self) -> list[bytes]:
        out = []
        while (line := self.lines.get(timeout=DEADLINE)) is not None:
            out.append(line)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)


def test_logs_follow_prints_each_line_as_it_is_written(live: Cluster, tmp_path: Path) -> None:
    gate = tmp_path / "go-on"
    script = (
        'echo "first line"; while [ ! -e "$1" ]; do sleep 0.02; done; echo "second line";'
        ' echo "to stderr" >&2'
    )
    spec = workflow("live", [command_action("talk", ["/bin/sh", "-c", script, "sh", str(gate)])])
    workflow_id = live.submit(spec)
    follower = Follower(live, workflow_id, "talk")
    try:
        assert follower.next_line() == b"first line\n"
        # Printed while the action waits for the gate: it cannot have ended.
        assert live.get(workflow_id).state == wf.WORKFLOW_STATE_RUNNING
        gate.touch()
        assert follower.next_line() == b"second line\n"
        assert follower.proc.wait(DEADLINE) == 0
        assert follower.rest() == []
        err = follower.stderr()
        assert "==> attempt 1" in err and "to stderr" in err
    finally:
        follower.close()
    assert live.wait_workflow(workflow_id).state == wf.WORKFLOW_STATE_SUCCEEDED
    # A finished action: -f prints its tails and exits at once.
    done = subprocess.run(
        [*PLAIT, "logs", "-f", workflow_id, "talk", "--coordinator", live.grpc_target],
        capture_output=True,
        timeout=DEADLINE,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"first line\nsecond line\n"


def test_a_flood_is_bounded_and_does_not_slow_the_attempt(live: Cluster, tmp_path: Path) -> None:
    size = 50_000_000
    gate = tmp_path / "flood"
    # "ready", then (once the follower is attached) 50 MB as fast as the pipe takes it.
    script = (
        'echo ready; while [ ! -e "$1" ]; do sleep 0.02; done;'
        f" head -c {size} /dev/zero | tr '\\000' x; echo; echo done"
    )
    spec = workflow("flood", [command_action("flood", ["/bin/sh", "-c", script, "sh", str(gate)])])
    workflow_id = live.submit(spec)
    follower = Follower(live, workflow_id, "flood", "-o", "json")
    try:
        first = json.loads(follower.next_line())
        assert first["data"] == "ready\n"
        started = time.monotonic()
        gate.touch()
        status = live.wait_workflow(workflow_id, timeout=DEADLINE)
        elapsed = time.monotonic() - started
        assert status.state == wf.WORKFLOW_STATE_SUCCEEDED
        assert follower.proc.wait(DEADLINE) == 0
        records = [first] + [json.loads(line) for line in follower.rest()]
    finally:
        follower.close()
    chunks = [r for r in records if "data" in r]
    (end,) = [r for r in records if r.get("ended")]
    assert end["action_state"] == "succeeded"
    streamed = sum(len(c["data"]) for c in chunks)
    # The worker sends at most 64 KiB per stream per 250 ms, plus the rest before the result.
    assert streamed <= (elapsed / 0.25 + 3) * 64 * 1024, (streamed, elapsed)
    assert streamed < size // 10
    offsets = [c["offset"] for c in chunks]
    assert offsets == sorted(offsets) and len(chunks) >= 2
    last = chunks[-1]  # the stream's end came through, after the gap the rate limit left
    assert last["offset"] + len(last["data"]) == len("ready\n") + size + len("\ndone\n")
    assert last["data"].endswith("x\ndone\n")
    # The coordinator kept at most its window, and holds nothing once the attempt ended.
    wait_for("live logs released", lambda: live.metric("plait_live_log_bytes") == 0)
