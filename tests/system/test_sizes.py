"""Sizes end to end, on real processes (issue 8): a lease too large for a message fails its
action at grant time naming ``max_lease_bytes``, the needs and their sizes, and nothing is sent;
``GetWorkflow`` and ``plait status`` answer whatever the outputs add up to; one action's whole
outputs can be read however large they are."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2

from plait.client import Client
from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from tests.system.harness import Cluster, daemon_env, python_action, workflow

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

MAX_MESSAGE = 4 * 1024 * 1024
MAX_LEASE = MAX_MESSAGE - 256 * 1024  # the default of max_lease_bytes
PLAIT = [sys.executable, "-m", "plait.cli.main"]


def blob_action(action_id: str, size: int) -> wf.ActionSpec:
    """An exec action whose outputs are ``{"blob": "xxx..."}`` of about ``size`` bytes."""
    return python_action(action_id, f'plait_output({{"blob": "x" * {size}}})')


def plait(cluster: Cluster, *argv: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as its own process."""
    return subprocess.run(
        [*PLAIT, *argv, "--coordinator", cluster.grpc_target],
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon_env(),
        check=False,
    )


def pages(cluster: Cluster, workflow_id: str) -> list[ws.GetWorkflowResponse]:
    """Every page of GetWorkflow through a raw stub with the default 4 MiB receive limit."""
    out, token = [], ""
    while True:
        reply = cluster.workflows.GetWorkflow(
            ws.GetWorkflowRequest(workflow_id=workflow_id, page_token=token), timeout=60
        )
        assert reply.ByteSize() <= MAX_MESSAGE
        out.append(reply)
        token = reply.next_page_token
        if not token:
            return out


def actions_of(cluster: Cluster, workflow_id: str) -> dict[str, wf.ActionStatus]:
    return {a.action_id: a for r in pages(cluster, workflow_id) for a in r.workflow.actions}


def test_six_large_needs_fail_their_sink_naming_the_limit_and_status_answers(
    cluster: Cluster,
) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=4)
    sizes = {f"p{i}": 900_000 + 1000 * ((i * 7) % 6) for i in range(6)}  # distinct sizes
    actions = [blob_action(name, size) for name, size in sizes.items()]
    actions.append(python_action("sink", "plait_output({})", needs=list(sizes)))
    workflow_id = cluster.submit(workflow("six-needs", actions))

    status = cluster.wait_workflow(workflow_id, timeout=120)

    assert status.state == wf.WORKFLOW_STATE_FAILED
    sink = actions_of(cluster, workflow_id)["sink"]  # after the needs' 5.4 MB: a later page
    assert sink.state == wf.ACTION_STATE_FAILED
    needs = actions_of(cluster, workflow_id)
    # Failed at grant time: never leased, no lease lost, nothing retried.
    assert (sink.attempt, sink.fencing_token, sink.lease_losses) == (0, 0, 0)
    assert sink.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"the limit max_lease_bytes is {MAX_LEASE}" in sink.reason
    largest_first = sorted(sizes, key=lambda name: -sizes[name])
    listed = sink.reason.split("largest first: ")[1].split(";")[0].split(", ")
    assert listed == [f"{name} {needs[name].outputs_bytes} bytes" for name in largest_first]
    info = error_details_pb2.ErrorInfo()
    assert sink.error.details[0].Unpack(info) and info.reason == "LEASE_TOO_LARGE"
    assert int(info.metadata["lease_bytes"]) > MAX_LEASE
    history = cluster.history(workflow_id)
    assert not [e for e in history if e.action_id == "sink" and e.type == wf.EVENT_TYPE_LEASE_LOST]
    assert "RESOURCE_EXHAUSTED" not in cluster.daemon("w1").log_tail()  # nothing went out
    # Status still answers: the needs' outputs (5.4 MB) come in pages.
    shown = plait(cluster, "status", workflow_id)
    assert shown.returncode == 0, shown.stderr
    assert "max_lease_bytes" in shown.stdout and "RESOURCE_EXHAUSTED" not in shown.stderr
    assert all(name in shown.stdout for name in [*sizes, "sink"])

    # The failure replays identically after a restart.
    cluster.restart("coordinator")
    again = actions_of(cluster, workflow_id)["sink"]
    assert (again.state, again.reason, again.error) == (sink.state, sink.reason, sink.error)
    assert cluster.get(workflow_id).state == wf.WORKFLOW_STATE_FAILED


def test_outputs_past_4mib_are_shown_by_status_and_get_workflow(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=4)
    sizes = {f"a{i}": 950_000 for i in range(6)}  # 5.7 MB of outputs
    sizes["small"] = 10
    workflow_id = cluster.submit(
        workflow("big-outputs", [blob_action(name, size) for name, size in sizes.items()])
    )
    assert cluster.wait_workflow(workflow_id, timeout=120).state == wf.WORKFLOW_STATE_SUCCEEDED

    replies = pages(cluster, workflow_id)
    assert len(replies) > 1
    got = {a.action_id: a for r in replies for a in r.workflow.actions}
    assert list(got) == list(sizes)  # every action once, in spec order
    for name, size in sizes.items():
        assert not got[name].outputs_truncated
        assert len(json.loads(got[name].outputs_json)["blob"]) == size
        assert got[name].outputs_bytes == len(got[name].outputs_json.encode())

    shown = plait(cluster, "status", workflow_id)
    assert shown.returncode == 0, shown.stderr
    assert all(name in shown.stdout for name in sizes)
    as_json = plait(cluster, "status", workflow_id, "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert [a["action_id"] for a in doc["actions"]] == list(sizes)
    assert sum(len(a["outputs_json"]) for a in doc["actions"]) > MAX_MESSAGE

    # ListWorkflows is as it was: one row, no actions.
    listed = cluster.list_workflows()
    assert [w.workflow_id for w in listed] == [workflow_id] and not listed[0].actions


def test_full_outputs_of_one_action_are_retrievable_however_large(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=6)
    items = python_action("list", "plait_output({'items': list(range(6))})")
    fan = python_action(
        "fan", "i = plait_inputs()['item']; plait_output({'i': i, 'blob': 'x' * 900_000})"
    )
    fan.needs.append("list")
    fan.map.over = "list.items"
    workflow_id = cluster.submit(workflow("map-outputs", [items, fan]))
    assert cluster.wait_workflow(workflow_id, timeout=120).state == wf.WORKFLOW_STATE_SUCCEEDED

    # 5.4 MB collected by the map: more than any response, so its status says so.
    statuses = actions_of(cluster, workflow_id)
    mapped = statuses["fan"]
    assert mapped.outputs_truncated and mapped.outputs_json == ""
    assert mapped.outputs_bytes > MAX_MESSAGE
    assert all(not statuses[f"fan.{i}"].outputs_truncated for i in range(6))

    with Client(cluster.grpc_target, tls=False) as client:
        text = client.outputs(workflow_id, "fan")
        one = client.outputs(workflow_id, "fan.3")
        whole = client.get(workflow_id)
    assert len(text.encode()) == mapped.outputs_bytes
    collected = json.loads(text)["items"]
    assert [c["i"] for c in collected] == list(range(6))
    assert all(len(c["blob"]) == 900_000 for c in collected)
    assert json.loads(one) == collected[3]
    assert [a.action_id for a in whole.actions] == list(statuses)  # the Client follows pages
    # Bad requests name their field.
    for request, field in [
        (ws.GetWorkflowRequest(workflow_id=workflow_id, page_token="999999"), "page_token"),
        (ws.GetWorkflowRequest(workflow_id=workflow_id, page_token="x"), "page_token"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            cluster.workflows.GetWorkflow(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert field in (info.value.details() or "")  # type: ignore[attr-defined]
    past = ws.GetActionOutputsRequest(
        workflow_id=workflow_id, action_id="fan", offset=mapped.outputs_bytes + 1
    )
    with pytest.raises(grpc.RpcError) as info:
        cluster.workflows.GetActionOutputs(past, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert f"the outputs are {mapped.outputs_bytes} bytes" in (info.value.details() or "")  # type: ignore[attr-defined]
    # The map's collected outputs were not copied into the journal a second time.
    done = [
        e
        for e in cluster.history(workflow_id)
        if e.action_id == "fan" and e.type == wf.EVENT_TYPE_ACTION_FINISHED
    ]
    assert done and done[-1].outputs_json == ""
