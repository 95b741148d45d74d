"""1 -> 50 -> 1 fan-out/fan-in of exec actions over three real workerd processes."""

from __future__ import annotations

import json

import pytest

from plait.v1 import workflow_pb2 as wf
from tests.system import invariants
from tests.system.harness import Cluster, describe, python_action, workflow

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

WIDTH = 50

START = "plait_output({'width': plait_inputs()['input']['width']})"
LEAF = """
got = plait_inputs()
width = got['needs']['start']['outputs']['width']
plait_output({'n': got['input']['n'], 'width': width})
"""
# The join records exactly what it was given, so the test checks the join's committed view.
JOIN = "plait_output({'saw': plait_inputs()['needs']})"


def fanout_spec() -> wf.WorkflowSpec:
    leaves = [f"leaf-{i:02d}" for i in range(WIDTH)]
    return workflow(
        "fanout",
        [
            python_action("start", START, input_json=json.dumps({"width": WIDTH})),
            *(
                python_action(leaf, LEAF, needs=["start"], input_json=json.dumps({"n": i}))
                for i, leaf in enumerate(leaves)
            ),
            python_action("join", JOIN, needs=leaves),
        ],
    )


def test_fan_out_fan_in_over_three_workers(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for name in ("w1", "w2", "w3"):
        cluster.add_worker(name, slots=4, wait=False)
    cluster.wait_workers(["w1", "w2", "w3"])
    spec = fanout_spec()

    workflow_id = cluster.submit(spec)
    status = cluster.wait_workflow(workflow_id, timeout=90)

    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    join = next(a for a in status.actions if a.action_id == "join")
    saw = json.loads(join.outputs_json)["saw"]
    assert sorted(saw) == sorted(f"leaf-{i:02d}" for i in range(WIDTH))
    for i in range(WIDTH):
        branch = saw[f"leaf-{i:02d}"]
        assert branch["state"] == "ACTION_STATE_SUCCEEDED", branch
        assert branch["outputs"] == {"n": i, "width": WIDTH}, branch

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    finished = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)
    assert {e.action_id for e in finished} == {a.id for a in spec.actions}
    assert all(e.action_state == wf.ACTION_STATE_SUCCEEDED for e in finished)
    # The join's committed outputs in the history agree with GetWorkflow.
    join_done = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "join")[0]
    assert json.loads(join_done.outputs_json) == json.loads(join.outputs_json)
    leaf_workers = {e.worker_id for e in finished if e.action_id.startswith("leaf-")}
    assert len(leaf_workers) > 1, f"all 50 leaves ran on {leaf_workers}"
    assert leaf_workers <= {"w1", "w2", "w3"}
    done = invariants.of_type(events, wf.EVENT_TYPE_WORKFLOW_FINISHED)
    assert [e.workflow_state for e in done] == [wf.WORKFLOW_STATE_SUCCEEDED]
    assert status.action_counts["ACTION_STATE_SUCCEEDED"] == WIDTH + 2
