"""`plait submit --watch`, `events --follow`, `status`, `retry --wait` and `workers` against a
real coordinator and workerd: the live view on a real terminal (a pty) with a stuck action's
reason, watches that ride out a coordinator restart without losing or repeating an event,
status paging with times and durations, and the outcome of `retry --wait`.

Every command runs as its own `plait` process. One cluster serves the module; the restart test
has its own (it kills the coordinator).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pytest

from tests.system.harness import ROOT, Cluster, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

PLAIT = [sys.executable, "-m", "plait.cli.main"]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Lines:
    """Collects a stream's lines on a thread, so a test can wait for one without blocking."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, what: str, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((line for line in self.lines if predicate(line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; saw:\n" + "\n".join(self.lines)
                self._cond.wait(left)

    def text(self) -> str:
        self._thread.join(10)
        return "\n".join(self.lines)


def plait(cluster: Cluster, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PLAIT, *argv, "--coordinator", cluster.grpc_target],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def start(cluster: Cluster, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PLAIT, *argv, "--coordinator", cluster.grpc_target],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator and one exec worker (no handlers), for every test but the restart."""
    c = Cluster(tmp_path_factory.mktemp("cli-watch"))
    try:
        c.start_coordinator()
        c.add_worker("w1", slots=4)
        yield c
    finally:
        c.close()


def on_a_terminal(argv: list[str]) -> tuple[subprocess.Popen[bytes], Callable[[], str]]:
    """Runs ``argv`` with stdout on a pty 200 columns wide; returns it and a reader of what it
    has drawn so far (escape sequences removed)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lambda: _ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_submit_watch_on_a_terminal_shows_progress_and_why_an_action_is_stuck(
    shared: Cluster, tmp_path: Path
) -> None:
    flow = write(
        tmp_path / "stuck.yaml",
        "name: stuck\nactions:\n  - {id: load, handler: load-text}\n"
        "  - {id: count, needs: [load], run: [true]}\n",
    )
    proc, drawn = on_a_terminal(
        [*PLAIT, "submit", flow, "--watch", "--coordinator", shared.grpc_target]
    )
    try:
        why = "no connected worker can run it (handler 'load-text'"
        wait_for("the stuck action's reason on the terminal", lambda: why in drawn(), 30)
        screen = drawn()
        assert "0/2" in screen and "ready 1" in screen and "pending 1" in screen, screen
        assert "action_leased" not in screen  # a view, not the event firehose
        wid = re.search(r"wf-[0-9a-f]{20}", screen)
        assert wid is not None, screen
        shared.cancel(wid.group(0))
        assert proc.wait(30) == 1  # cancelled: not a success
        wait_for("the final table", lambda: "state     cancelled" in drawn(), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_and_follow_ride_out_a_coordinator_restart(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=2)
    gate = tmp_path / "gate"
    flow = write(
        tmp_path / "gated.yaml",
        "name: gated\nactions:\n  - {id: first, run: [true]}\n"
        f"  - {{id: held, needs: [first], run: 'while [ ! -e {gate} ]; do sleep 0.05; done'}}\n"
        "  - {id: last, needs: [held], run: [true]}\n",
    )
    submit = start(cluster, "submit", flow, "--watch", "-o", "json")
    watched = Lines(submit.stdout)  # type: ignore[arg-type]
    wid = json.loads(watched.wait("the first event", bool))["workflow_id"]
    events = start(cluster, "events", wid, "--follow")
    followed = Lines(events.stdout)  # type: ignore[arg-type]
    try:
        watched.wait("held started", lambda s: '"EVENT_TYPE_ACTION_STARTED"' in s and '"held"' in s)
        followed.wait("held started", lambda s: "action_started" in s and " held " in s)

        cluster.restart("coordinator")  # SIGKILL, then the same command line on the same port
        gate.touch()

        assert submit.wait(60) == 0, submit.stderr.read()  # type: ignore[union-attr]
        assert events.wait(60) == 0, events.stderr.read()  # type: ignore[union-attr]
    finally:
        for proc in (submit, events):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    history = [int(e.sequence) for e in cluster.history(wid)]
    docs = [json.loads(line) for line in watched.text().splitlines()]
    seen_by_watch = [int(d["sequence"]) for d in docs if "type" in d]
    seen_by_follow = [int(line.split()[0]) for line in followed.text().splitlines()[1:]]
    # Every event once, in order: nothing lost across the restart, nothing repeated.
    assert seen_by_watch == history
    assert seen_by_follow == history
    assert docs[-1]["workflow"]["state"] == "WORKFLOW_STATE_SUCCEEDED"
    for proc in (submit, events):
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert err.count("reconnecting for up to 60s") == 1, err
        assert "Traceback" not in err


def test_status_pages_filters_and_shows_times(shared: Cluster, tmp_path: Path) -> None:
    flow = write(
        tmp_path / "wide.yaml",
        "name: wide\nactions:\n"
        + "".join(f"  - {{id: a{i:02d}, run: [true]}}\n" for i in range(30))
        + '  - id: out\n    run: |\n      echo \'{"n": 3, "who": ["x"]}\' > "$PLAIT_OUTPUT"\n',
    )
    done = plait(shared, "submit", flow, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    wid = done.stdout.splitlines()[0]
    # --wait prints the outcome with each action's start, end and duration.
    assert "started" in done.stdout and "ended" in done.stdout
    assert re.search(r"duration  \d", done.stdout), done.stdout

    few = plait(shared, "status", wid, "--limit", "5")
    assert few.returncode == 0, few.stderr
    rows = [line for line in few.stdout.splitlines() if re.match(r"\s*(a\d\d|out)\s", line)]
    assert len(rows) == 5, few.stdout
    assert "26 more action(s) not shown" in few.stdout
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3}", rows[0]), rows[0]

    doc = json.loads(plait(shared, "status", wid, "--state", "succeeded", "-o", "json").stdout)
    assert len(doc["actions"]) == 31 and doc["actions_omitted"] == 0
    out = next(a for a in doc["actions"] if a["action_id"] == "out")
    assert out["outputs"] == {"n": 3, "who": ["x"]}
    assert json.loads(out["outputs_json"]) == out["outputs"]
    started = datetime.fromisoformat(out["started_at"])
    assert started <= datetime.fromisoformat(out["finished_at"])
    assert abs((datetime.now(UTC) - started).total_seconds()) < 600

    none = json.loads(
        plait(shared, "status", wid, "--state", "failed,timed_out", "-o", "json").stdout
    )
    assert none["actions"] == [] and none["actions_omitted"] == 0

    bad = plait(shared, "status", wid, "--state", "finished")
    assert bad.returncode == 2
    assert "--state" in bad.stderr and "expected one of pending" in bad.stderr


def test_retry_wait_prints_the_outcome(shared: Cluster, tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    flow = write(
        tmp_path / "flaky.yaml",
        f"name: flaky\nactions:\n  - {{id: check, run: 'test -e {ok}'}}\n"
        "  - {id: after, needs: [check], run: [true]}\n",
    )
    failed = plait(shared, "submit", flow, "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    wid = failed.stdout.splitlines()[0]
    ok.touch()
    again = plait(shared, "retry", wid, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-running 2 action(s)" in again.stdout
    assert "state     succeeded" in again.stdout and "after" in again.stdout


def test_workers_show_when_they_connected(shared: Cluster) -> None:
    doc = json.loads(plait(shared, "workers", "-o", "json").stdout)
    (w1,) = doc["workers"]
    connected = datetime.fromisoformat(w1["connected_at"])
    assert abs((datetime.now(UTC) - connected).total_seconds()) < 600  # not 1970
    table = plait(shared, "workers").stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\S+ ago\)", table), table
