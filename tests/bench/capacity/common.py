"""What the capacity sections share: handlers, timings, a local cluster, workflows to submit,
and the readings of a running coordinator (its commits, its last replay)."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from tests.bench import shapes
from tests.system.harness import Cluster, Daemon
from tests.system.specs import handler_action, workflow

MIB = 1024 * 1024
NOOP = "tests.bench.noop_handlers:worker"
SLEEP = "tests.conformance.handlers:worker"  # "sleep": sleeps input.seconds
DEFAULTS: dict[str, str | None] = {  # the coordinator's own timings, not the test profile's
    "heartbeat_interval": None,
    "lease_ttl": None,
    "kill_grace": None,
}
REPLAYED = re.compile(r"replayed (\d+) events in ([\d.]+)s; serving ([\d.]+)s after start")


@contextlib.contextmanager
def local_cluster(prefix: str) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix=f"plait-capacity-{prefix}-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            yield cluster
        finally:
            cluster.close()


def coordinator_pid(cluster: Cluster) -> int:
    assert cluster.endpoints is not None
    return cluster.endpoints.pid


def noop_workflow(name: str, n: int) -> wf.WorkflowSpec:
    return workflow(name, (handler_action(f"n{i}", "noop") for i in range(n)))


def sleep_workflow(name: str, n: int, seconds: float) -> wf.WorkflowSpec:
    return workflow(
        name,
        (
            wf.ActionSpec(id=f"s{i}", handler="sleep", input_json=json.dumps({"seconds": seconds}))
            for i in range(n)
        ),
    )


def chain_workflow(name: str, n: int) -> wf.WorkflowSpec:
    return workflow(
        name,
        (handler_action(f"c{i}", "noop", needs=[f"c{i - 1}"] if i else []) for i in range(n)),
    )


def run_ok(cluster: Cluster, spec: wf.WorkflowSpec, timeout: float = 300) -> shapes.PlaitRun:
    """Submits ``spec`` and waits for it (``tests.bench.shapes``); it must succeed."""
    run = shapes.submit_and_wait(cluster, spec, timeout)
    if run.state != "SUCCEEDED":
        raise RuntimeError(f"{spec.name} ended {run.state}")
    return run


def commit_stats(cluster: Cluster) -> tuple[float, float]:
    """(seconds, commits) so far from ``plait_journal_commit_seconds``."""
    return (
        cluster.metric("plait_journal_commit_seconds_sum"),
        cluster.metric("plait_journal_commit_seconds_count"),
    )


def chain_cost(cluster: Cluster, n: int) -> tuple[float, float]:
    """Runs a chain of ``n`` no-ops; returns (ms per step on the coordinator, mean ms per
    journal commit meanwhile)."""
    before = commit_stats(cluster)
    run = run_ok(cluster, chain_workflow(f"chain-{n}", n))
    after = commit_stats(cluster)
    commits = max(1.0, after[1] - before[1])
    return run.coordinator_s * 1000 / n, (after[0] - before[0]) / commits * 1000


def replay_line(daemon: Daemon) -> tuple[int, float] | None:
    """(events, seconds) of the daemon's last 'replayed N events in S s' log line."""
    found = REPLAYED.findall(daemon.log_path.read_text(errors="replace"))
    if not found:
        return None
    events, seconds, _ = found[-1]
    return int(events), float(seconds)
