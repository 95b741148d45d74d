"""The documented maximum, 100,000 actions, through ``plait submit`` to a real coordinator.

The wide workflow of ``tests.bench.big_submit`` (99,990 independent exec actions and 10 joins of
9,999 needs) is written as YAML, submitted by a ``plait`` process, and must be accepted whole:
every action and every edge stored, the workflow directory sent once (in the workflow's env), and
nothing run (there are no workers). How long it takes is the benchmark's business
(docs/benchmarks.md); here only a generous bound guards against a return of the 33 s loader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from tests.bench.big_submit import JOINS, wide_yaml
from tests.system.harness import Cluster

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


@pytest.mark.slow
def test_plait_submit_takes_100k_actions_whole(cluster: Cluster, tmp_path: Path) -> None:
    endpoints = cluster.start_coordinator()
    flow = tmp_path / "wide.yaml"
    flow.write_text(wide_yaml())
    argv = ["submit", str(flow), "-o", "json", "--coordinator", endpoints.grpc]
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli.main", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert '"created": true' in done.stdout
    workflow_id = done.stdout.split('"workflow_id": "', 1)[1].split('"', 1)[0]

    reply = cluster.workflows.GetWorkflow(
        ws.GetWorkflowRequest(workflow_id=workflow_id, page_size=1), timeout=30
    )
    status = reply.workflow
    assert status.name == "wide-100000"
    assert sum(status.action_counts.values()) == 100_000
    assert status.action_counts["ACTION_STATE_READY"] == 100_000 - JOINS  # the leaves
    assert status.action_counts["ACTION_STATE_PENDING"] == JOINS

    # The coordinator's own copy: every action and edge, and the directory once.
    spec = cluster_spec(cluster, workflow_id)
    assert len(spec.actions) == 100_000
    assert sum(len(a.needs) for a in spec.actions) == JOINS * 9_999
    assert spec.env["PLAIT_WORKFLOW_DIR"] == str(tmp_path.resolve())
    assert not any(a.env for a in spec.actions)


def cluster_spec(cluster: Cluster, workflow_id: str) -> wf.WorkflowSpec:
    """The spec as journalled: the WORKFLOW_SUBMITTED event's, read from the history."""
    for event in cluster.history(workflow_id):
        if event.type == wf.EVENT_TYPE_WORKFLOW_SUBMITTED:
            assert event.HasField("spec"), event
            return event.spec
    raise AssertionError(f"no WORKFLOW_SUBMITTED event for {workflow_id}")
