"""The coordinator's /metrics while a fork/join workflow with a map runs on a real workerd.

A real coordinator subprocess and a real workerd subprocess; the branches wait for a gate file
the test creates, so the gauges are read while work is leased and running (the test waits on
what /metrics says, not on time). Then the counters and histograms of the finished workflow,
and ``promtool check metrics`` on the real exposition.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plait.v1 import workflow_pb2 as wf
from tests.system.harness import Cluster, describe, python_action, wait_for, workflow
from tests.tools import required_tool

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

START = "plait_output({'items': [1, 2, 3]})"
# Branches hold their slot until the test opens the gate (a file), so gauges can be read.
GATED = """
import time
gate = plait_inputs()['input']['gate']
while not os.path.exists(gate):
    time.sleep(0.02)
plait_output({'ok': True})
"""
JOIN = "plait_output({'saw': sorted(plait_inputs()['needs'])})"


def fork_join_with_map(gate: Path) -> wf.WorkflowSpec:
    """start -> (b1, b2, each: a map over start's items) -> join (b1, b2, each)."""
    gated = json.dumps({"gate": str(gate)})
    each = python_action("each", GATED, needs=["start"], input_json=gated)
    each.map.over = "start.items"
    return workflow(
        "metrics-fork-join",
        [
            python_action("start", START),
            python_action("b1", GATED, needs=["start"], input_json=gated),
            python_action("b2", GATED, needs=["start"], input_json=gated),
            each,
            python_action("join", JOIN, needs=["b1", "b2", "each"]),
        ],
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def openmetrics(cluster: Cluster) -> str:
    """The scrape as Prometheus asks for it when it wants exemplars."""
    assert cluster.endpoints is not None
    req = urllib.request.Request(
        f"http://{cluster.endpoints.metrics}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


def test_fork_join_metrics_on_a_real_coordinator(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=8)
    gate = tmp_path / "gate"
    workflow_id = cluster.submit(fork_join_with_map(gate))

    # While the branches hold their leases: b1, b2 and the three children run on w1.
    def running() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        s = samples(cluster.metrics())
        both = value(s, "plait_items_in_flight", kind="map") == 3
        # b1, b2, three children, and the map action itself (RUNNING as its children). The
        # gauges read the decided state; the starts' histogram is observed once their batch
        # has committed, which a loaded disk may delay past a scrape: wait for both.
        started = value(s, "plait_schedule_to_start_seconds_count") == 6  # start + 5 branches
        return s if both and started and value(s, "plait_actions", state="running") == 6 else None

    live = wait_for("five attempts running (two branches, three map children)", running)
    assert value(live, "plait_workflows_running") == 1
    assert value(live, "plait_actions", state="pending") == 1  # join
    assert value(live, "plait_queue_depth", **{"class": "exec"}) == 0
    assert value(live, "plait_worker_slots", worker="w1") == 8
    assert value(live, "plait_worker_slots_used", worker="w1") == 5
    # Sane, not timed: a loaded machine delays heartbeats and messages (same host: no skew).
    assert 0 <= value(live, "plait_worker_heartbeat_age_seconds", worker="w1") < 10.0
    assert abs(value(live, "plait_worker_clock_offset_seconds", worker="w1")) < 5.0
    assert value(live, "plait_leader") == 1 and value(live, "plait_term") >= 1
    assert value(live, "plait_fork_width_count", kind="dependents") == 1
    assert value(live, "plait_fork_width_sum", kind="dependents") == 3  # b1, b2, each
    assert value(live, "plait_fork_width_sum", kind="map") == 3

    gate.touch()
    status = cluster.wait_workflow(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    text = cluster.metrics()
    done = samples(text)
    assert value(done, "plait_workflows_running") == 0
    assert value(done, "plait_actions", state="running") == 0
    assert value(done, "plait_items_in_flight", kind="map") == 0
    assert value(done, "plait_worker_slots_used", worker="w1") == 0
    assert value(done, "plait_joins_total", join="all", outcome="met") == 2  # each, join
    assert value(done, "plait_join_wait_seconds_count", join="all") == 2
    assert value(done, "plait_schedule_to_start_seconds_count") == 7
    assert value(done, "plait_action_duration_seconds_count") == 7
    assert "_created" not in text
    assert "plait_stale_results_refused_total" not in text
    build = [k for k in done if k[0] == "plait_build_info"]
    assert len(build) == 1 and done[build[0]] == 1

    # Exemplars (OpenMetrics) carry the workflow's trace id on duration observations.
    status_trace = cluster.get(workflow_id).trace_id
    om = openmetrics(cluster)
    lines = [x for x in om.splitlines() if x.startswith("plait_schedule_to_start_seconds_bucket")]
    assert any("trace_id=" in x for x in lines), lines
    if status_trace:  # filled by WorkflowStatus.trace_id once the traces work lands
        assert any(status_trace in x for x in lines), (status_trace, lines)


def test_promtool_check_metrics_is_clean(cluster: Cluster) -> None:
    promtool = required_tool("promtool")
    cluster.start_coordinator(log_format="json")
    cluster.add_worker("w1", slots=2)
    workflow_id = cluster.submit(workflow("promtool", [python_action("a", "plait_output({})")]))
    cluster.wait_workflow(workflow_id, timeout=60)
    text = cluster.metrics()
    # --log-format json: every line the coordinator logged is one JSON object with context.
    logged = (cluster.tmp / "coordinator.log").read_text().splitlines()
    records = [json.loads(x) for x in logged if x.startswith("{")]
    assert records and {"ts", "level", "logger", "message"} <= set(records[0])
    assert not [x for x in logged if x and not x.startswith(("{", "====="))], logged
    connected = [r for r in records if r["message"] == "worker w1 connected"]
    assert connected and connected[0]["worker_id"] == "w1"
    assert 'plait_worker_slots{worker="w1"}' in text
    done = subprocess.run(
        [promtool, "check", "metrics"],
        check=False,
        input=text.encode(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
