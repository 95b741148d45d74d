"""Workers whose wall clocks are an hour ahead and an hour behind change nothing.

No lease expires spuriously (timeouts are judged on the coordinator's monotonic clock), the
history stays causally ordered, and the coordinator does not merge the +1 h worker's stamps:
its own HLC stays near real time and the rejections are counted for that worker.
"""

from __future__ import annotations

import shutil
import time

import pytest

from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import workflow_pb2 as wf
from tests.system import invariants
from tests.system.harness import Cluster, command_action, describe, workflow

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

LAYERS, WIDTH = 6, 5
HOUR_MS = 3_600_000
# The coordinator's HLC may lead real time by the max clock offset it accepts (500 ms), plus
# scheduling noise; an hour-ahead merge would be far outside this.
NEAR_MS = 5_000


def layered_spec() -> wf.WorkflowSpec:
    """LAYERS x WIDTH no-op actions; each needs two actions of the layer before."""
    true = shutil.which("true") or "/bin/true"
    actions = []
    for layer in range(LAYERS):
        for j in range(WIDTH):
            needs = [f"l{layer - 1}-{j}", f"l{layer - 1}-{(j + 1) % WIDTH}"] if layer else []
            actions.append(command_action(f"l{layer}-{j}", [true], needs=needs))
    return workflow("clock-skew", actions)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def test_skewed_workers_cause_no_expiry_and_keep_causal_order(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w-ahead", slots=2, env={"PLAIT_CLOCK_OFFSET": "1h"}, wait=False)
    cluster.add_worker("w-behind", slots=2, env={"PLAIT_CLOCK_OFFSET": "-1h"}, wait=False)
    cluster.wait_workers(["w-ahead", "w-behind"])
    spec = layered_spec()
    started_ms = wall_ms()

    workflow_id = cluster.submit(spec)
    status = cluster.wait_workflow(workflow_id, timeout=90)
    ended_ms = wall_ms()

    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST)
    assert not lost, "spurious expiry: " + "; ".join(map(invariants.show, lost))

    # The coordinator's clock was not dragged an hour ahead (nor left behind).
    for e in events:
        assert started_ms - NEAR_MS <= e.hlc.physical_ms <= ended_ms + NEAR_MS, invariants.show(e)

    finished = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)
    by_worker = {w: [e for e in finished if e.worker_id == w] for w in ("w-ahead", "w-behind")}
    assert all(by_worker.values()), f"work did not reach both workers: {by_worker.keys()}"
    # Each worker's own stamps are kept beside the coordinator's, skew and all.
    for e in by_worker["w-ahead"]:
        assert e.worker_hlc.physical_ms > ended_ms + HOUR_MS - 10 * 60_000, invariants.show(e)
    for e in by_worker["w-behind"]:
        assert e.worker_hlc.physical_ms > 0, invariants.show(e)

    assert cluster.metric("plait_clock_offset_rejections_total", worker="w-ahead") > 0
    assert cluster.metric("plait_clock_offset_rejections_total", worker="w-behind") == 0
    workers = cluster.admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=10).workers
    rejections = {w.worker_id: w.clock_offset_rejections for w in workers}
    assert rejections["w-ahead"] > 0
    assert rejections["w-behind"] == 0


def test_a_successor_whose_clock_runs_ahead_fires_no_timer_early(cluster: Cluster) -> None:
    """Replay re-arms a ready action's queue timeout from its journalled age; a coordinator
    restarted with its wall clock an hour ahead must not count that hour (it would time the
    action out at once): the time no coordinator ran is not measured by two clocks."""
    cluster.start_coordinator()
    true = shutil.which("true") or "/bin/true"
    action = command_action("a", [true])
    action.queue_timeout.FromSeconds(60)  # no worker yet: the action waits READY
    workflow_id = cluster.submit(workflow("queued", [action]))
    daemon = cluster.daemon("coordinator")
    cluster.kill("coordinator")
    daemon.env["PLAIT_CLOCK_OFFSET"] = "1h"
    cluster.restart("coordinator")

    cluster.add_worker("w1", slots=1)
    status = cluster.wait_workflow(workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
