"""The `plait` client commands against a real coordinator and real workerd processes.

The coordinator runs as `plait coordinator` (a subprocess, test timing profile) and two
`python -m plait.workerd` processes serve it; every command runs as its own `plait` process.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        importlib.util.find_spec("plait.coordinator.main") is None
        or importlib.util.find_spec("plait.workerd.main") is None,
        reason="needs plait.coordinator and plait.workerd",
    ),
]

PLAIT = [sys.executable, "-m", "plait.cli.main"]
TEST_PROFILE = ["--heartbeat-interval", "250ms", "--lease-ttl", "2s", "--kill-grace", "250ms"]


@dataclass
class Cluster:
    target: str
    tmp: Path

    def plait(self, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PLAIT, *argv, "--coordinator", self.target],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def flow(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # One cluster per test: workerd starts helpers as it goes, and the leak check wants every
    # process a test saw started to be stopped by the end of that test.
    tmp = tmp_path
    ready = tmp / "ready.json"
    log = (tmp / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(
        [
            *PLAIT,
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--store",
            f"sqlite:///{tmp}/plait.db",
            "--ready-file",
            str(ready),
            *TEST_PROFILE,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert coordinator.poll() is None, (tmp / "coordinator.log").read_text()
            assert time.monotonic() < deadline, "coordinator did not become ready"
            time.sleep(0.05)
        target = json.loads(ready.read_text())["grpc"]
        for i in range(2):
            wlog = (tmp / f"workerd-{i}.log").open("wb")
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "plait.workerd",
                        "--coordinator",
                        target,
                        "--id",
                        f"sys-{i}",
                        "--slots",
                        "4",
                        "--handlers",
                        "examples.handlers:worker",
                        "--allow-root",
                    ],
                    stdout=wlog,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
        yield Cluster(target, tmp)
    finally:
        for w in workers:
            _stop(w)
        _stop(coordinator)
        log.close()


def test_workers_are_listed(cluster: Cluster) -> None:
    deadline = time.monotonic() + 20
    while True:
        done = cluster.plait("workers", "-o", "json")
        assert done.returncode == 0, done.stderr
        ids = sorted(w["worker_id"] for w in json.loads(done.stdout)["workers"])
        if ids == ["sys-0", "sys-1"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ids == ["sys-0", "sys-1"]
    table = cluster.plait("workers")
    assert "sys-0" in table.stdout and "sys-1" in table.stdout


def test_submit_wait_status_events_logs(cluster: Cluster) -> None:
    flow = str(EXAMPLES / "scatter_gather.yaml")
    done = cluster.plait("submit", flow, "--wait", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    wid = result["workflow_id"]
    assert result["created"] is True
    assert result["workflow"]["state"] == "WORKFLOW_STATE_SUCCEEDED"

    status = cluster.plait("status", wid, "-o", "json")
    assert status.returncode == 0
    doc = json.loads(status.stdout)
    assert doc["workflow_id"] == wid
    assert len(doc["actions"]) == 14
    assert {a["state"] for a in doc["actions"]} == {"ACTION_STATE_SUCCEEDED"}
    gather = next(a for a in doc["actions"] if a["action_id"] == "gather")
    assert json.loads(gather["outputs_json"])["total"] == 576720200
    assert "gather" in cluster.plait("status", wid).stdout

    events = cluster.plait("events", wid)
    assert events.returncode == 0
    rows = [line.split() for line in events.stdout.splitlines()[1:]]
    seqs = [int(r[0]) for r in rows]
    hlcs = [tuple(int(x) for x in r[1].split(".")) for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)
    assert rows[-1][2:4] == ["workflow_finished", "succeeded"]
    as_json = cluster.plait("events", wid, "-o", "json")
    assert [int(json.loads(x)["sequence"]) for x in as_json.stdout.splitlines()] == seqs

    logs = cluster.plait("logs", wid, "gather")
    assert logs.returncode == 0
    assert "gathered 12 branches" in logs.stdout

    listed = json.loads(cluster.plait("list", "-o", "json").stdout)
    assert wid in [w["workflow_id"] for w in listed["workflows"]]
    ok = json.loads(cluster.plait("list", "--state", "succeeded", "-o", "json").stdout)
    assert {w["state"] for w in ok["workflows"]} == {"WORKFLOW_STATE_SUCCEEDED"}


def test_idempotent_submit(cluster: Cluster) -> None:
    flow = cluster.flow("idem.yaml", "name: idem\nactions: [{id: a, run: [true]}]\n")
    first = cluster.plait("submit", flow, "--idempotency-key", "k-1", "-o", "json")
    again = cluster.plait("submit", flow, "--idempotency-key", "k-1", "-o", "json")
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["workflow_id"] == b["workflow_id"]
    assert (a["created"], b["created"]) == (True, False)


def test_failed_workflow_exits_1_and_names_the_action(cluster: Cluster) -> None:
    flow = cluster.flow(
        "fails.yaml",
        "name: fails\nactions:\n"
        "  - {id: ok, run: [true]}\n"
        "  - {id: boom, needs: ok, run: 'echo bad >&2; exit 3'}\n"
        "  - {id: after, needs: boom, run: [true]}\n",
    )
    done = cluster.plait("submit", flow, "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    wid = done.stdout.splitlines()[0]
    doc = json.loads(cluster.plait("status", wid, "-o", "json").stdout)
    states = {a["action_id"]: a["state"] for a in doc["actions"]}
    assert states == {
        "ok": "ACTION_STATE_SUCCEEDED",
        "boom": "ACTION_STATE_FAILED",
        "after": "ACTION_STATE_SKIPPED",
    }
    assert doc["state"] == "WORKFLOW_STATE_FAILED"
    assert "boom" in doc["reason"]
    assert "bad" in cluster.plait("logs", wid, "boom").stdout


def test_watch_streams_until_the_end(cluster: Cluster) -> None:
    flow = cluster.flow(
        "watch.yaml",
        "name: watch\nactions: [{id: a, run: [true]}, {id: b, needs: a, run: [true]}]\n",
    )
    done = cluster.plait("submit", flow, "--watch")
    assert done.returncode == 0, done.stderr
    assert "action_finished" in done.stdout and "workflow_finished" in done.stdout


def test_cancel(cluster: Cluster) -> None:
    flow = cluster.flow(
        "slow.yaml",
        "name: slow\nactions:\n  - {id: nap, run: [sleep, '60']}\n"
        "  - {id: then, needs: nap, run: [true]}\n",
    )
    submitted = cluster.plait("submit", flow)
    wid = submitted.stdout.strip()
    deadline = time.monotonic() + 30
    while True:
        doc = json.loads(cluster.plait("status", wid, "-o", "json").stdout)
        if doc["actions"][0]["state"] == "ACTION_STATE_RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert doc["actions"][0]["state"] == "ACTION_STATE_RUNNING"
    cancelled = cluster.plait("cancel", wid, "--reason", "system test", "-o", "json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["workflow_id"] == wid
    # The running attempt is told to stop; the workflow ends CANCELLED well before 60 s.
    deadline = time.monotonic() + 30
    while True:
        doc = json.loads(cluster.plait("status", wid, "-o", "json").stdout)
        if doc["state"] != "WORKFLOW_STATE_RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert doc["state"] == "WORKFLOW_STATE_CANCELLED"
    events = cluster.plait("events", wid).stdout
    assert "workflow_cancel_requested" in events


def test_unknown_workflow_exits_2(cluster: Cluster) -> None:
    done = cluster.plait("status", "wf-does-not-exist")
    assert done.returncode == 2
    assert "wf-does-not-exist" in done.stderr


def test_handlers_example(cluster: Cluster) -> None:
    done = cluster.plait("submit", str(EXAMPLES / "handlers.yaml"), "--wait", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    actions = {a["action_id"]: a for a in json.loads(done.stdout)["workflow"]["actions"]}
    merged = json.loads(actions["merge"]["outputs_json"])
    assert merged["words"] > 20
    assert ["the", 4] in merged["top"]
