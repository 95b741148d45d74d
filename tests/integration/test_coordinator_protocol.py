"""The worker protocol against a real coordinator, spoken by a hand-driven worker."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from plait.coordinator.server import CoordinatorServer
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.protocol_worker import ProtocolWorker


def fan_spec(width: int) -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="fan")
    spec.actions.add(id="split", handler="noop")
    for i in range(width):
        spec.actions.add(id=f"b{i}", handler="noop", needs=["split"])
    spec.actions.add(id="join", handler="noop", needs=[f"b{i}" for i in range(width)])
    return spec


async def submit(target: str, spec: pb.WorkflowSpec, key: str = "") -> tuple[str, bool]:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await wsgrpc.WorkflowServiceStub(ch).SubmitWorkflow(
            wspb.SubmitWorkflowRequest(spec=spec, idempotency_key=key)
        )
        return resp.workflow_id, resp.created


async def history(target: str, workflow_id: str) -> list[pb.HistoryEvent]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = wsgrpc.WorkflowServiceStub(ch)
        return [
            e
            async for r in stub.WatchWorkflow(
                wspb.WatchWorkflowRequest(workflow_id=workflow_id, follow=False)
            )
            for e in r.events
        ]


async def get(target: str, workflow_id: str) -> pb.WorkflowStatus:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await wsgrpc.WorkflowServiceStub(ch).GetWorkflow(
            wspb.GetWorkflowRequest(workflow_id=workflow_id)
        )
        return resp.workflow


@pytest.mark.timeout(30)
async def test_fan_out_fan_in_join_sees_every_branch(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "w1", slots=8)
    welcome = await w.connect()
    assert welcome.lease_ttl.ToMilliseconds() == 600
    wf_id, created = await submit(target, fan_spec(5))
    assert created
    (split,) = await w.grants(1)
    assert split.action_id == "split" and split.fencing_token == 1 and split.traceparent
    w.finish(split, '{"n": 5}')
    w.credit(1)
    branches = await w.grants(5)
    assert sorted(b.action_id for b in branches) == [f"b{i}" for i in range(5)]
    assert json.loads(branches[0].inputs_json)["needs"]["split"]["outputs"] == {"n": 5}
    for b in branches:
        w.finish(b, json.dumps({"i": b.action_id}))
    w.credit(5)
    (join,) = await w.grants(1)
    needs = json.loads(join.inputs_json)["needs"]
    assert {k: v["outputs"]["i"] for k, v in needs.items()} == {f"b{i}": f"b{i}" for i in range(5)}
    w.finish(join)
    ack = await w.next("ack")
    assert all(r.status.code == 0 for r in ack.ack.results)
    status = await get(target, wf_id)
    assert status.state == pb.WORKFLOW_STATE_SUCCEEDED
    events = await history(target, wf_id)
    seqs = [e.sequence for e in events]
    hlcs = [(e.hlc.physical_ms, e.hlc.logical) for e in events]
    assert seqs == sorted(seqs) and hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)
    assert events[-1].type == pb.EVENT_TYPE_WORKFLOW_FINISHED
    await w.close()


@pytest.mark.timeout(30)
async def test_expired_lease_is_released_and_stale_result_refused(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    zombie = ProtocolWorker(target, "zombie", slots=1)
    await zombie.connect()
    spec = pb.WorkflowSpec(name="one")
    spec.actions.add(id="a", handler="noop")
    wf_id, _ = await submit(target, spec)
    (lease1,) = await zombie.grants(1)
    assert lease1.fencing_token == 1
    # The zombie never heartbeats again (it only keeps its stream from going silent): after
    # the TTL the lease is lost and it is told to stop.
    chatter = asyncio.create_task(zombie.chatter())
    cancel = await zombie.next("cancel_lease", timeout=5)
    assert cancel.cancel_lease.leases[0].reason == wpb.CANCEL_REASON_SUPERSEDED
    healthy = ProtocolWorker(target, "healthy", slots=1)
    await healthy.connect()
    (lease2,) = await healthy.grants(1)
    assert lease2.action_id == "a" and lease2.fencing_token == 2 and lease2.attempt == 2
    zombie.finish(lease1, '{"who": "zombie"}')
    ack = await zombie.next("ack")
    refused = ack.ack.results[0]
    assert refused.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert refused.status.message == "lease token 1 superseded by 2"
    healthy.finish(lease2, '{"who": "healthy"}')
    assert (await healthy.next("ack")).ack.results[0].status.code == 0
    # The same result again gets the same ack.
    healthy.finish(lease2, '{"who": "healthy"}')
    assert (await healthy.next("ack")).ack.results[0].status.code == 0
    status = await get(target, wf_id)
    assert status.state == pb.WORKFLOW_STATE_SUCCEEDED
    assert json.loads(status.actions[0].outputs_json) == {"who": "healthy"}
    events = await history(target, wf_id)
    types = [pb.EventType.Name(e.type) for e in events]
    assert types.count("EVENT_TYPE_ACTION_FINISHED") == 1
    assert "EVENT_TYPE_LEASE_LOST" in types and "EVENT_TYPE_STALE_RESULT_REFUSED" in types
    chatter.cancel()
    await zombie.close()
    await healthy.close()


@pytest.mark.timeout(30)
async def test_heartbeats_renew_leases_and_reconcile(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "w", slots=2)
    await w.connect()
    spec = pb.WorkflowSpec(name="two")
    spec.actions.add(id="a", handler="noop")
    spec.actions.add(id="b", handler="noop")
    wf_id, _ = await submit(target, spec)
    leases = await w.grants(2)
    a, b = sorted(leases, key=lambda l: l.action_id)
    # Heartbeat for well past the TTL while reporting only `a`: `b` is released at once.
    for _ in range(10):
        w.heartbeat([a])
        await asyncio.sleep(0.1)
    status = await get(target, wf_id)
    states = {s.action_id: s for s in status.actions}
    assert states["a"].lease_losses == 0 and states["a"].fencing_token == 1
    assert states["b"].lease_losses >= 1
    # A lease the coordinator never granted is cancelled.
    w.heartbeat([a, wpb.Lease(lease_id=f"{wf_id}/zzz/9", fencing_token=9)])
    cancel = await w.next("cancel_lease")
    assert cancel.cancel_lease.leases[0].reason == wpb.CANCEL_REASON_UNKNOWN_LEASE
    await w.close()


async def test_idempotency_key_returns_existing_workflow(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    first = await submit(target, fan_spec(2), key="k-1")
    again = await submit(target, fan_spec(2), key="k-1")
    assert first[1] and not again[1] and first[0] == again[0]


async def test_retry_workflow_over_grpc(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "w1", slots=2)
    await w.connect()
    spec = pb.WorkflowSpec(name="retry")
    spec.actions.add(id="a", handler="noop")
    wf_id, _ = await submit(target, spec)
    (first,) = await w.grants(1)
    w.finish(first, outcome=wpb.ACTION_OUTCOME_FAILED)
    w.credit(1)
    for _ in range(50):
        if (await get(target, wf_id)).state == pb.WORKFLOW_STATE_FAILED:
            break
        await asyncio.sleep(0.05)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = wsgrpc.WorkflowServiceStub(ch)
        resp = await stub.RetryWorkflow(wspb.RetryWorkflowRequest(workflow_id=wf_id))
        assert list(resp.action_ids) == ["a"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RetryWorkflow(wspb.RetryWorkflowRequest(workflow_id=wf_id))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    (second,) = await w.grants(1)
    assert second.fencing_token == 2
    w.finish(second)
    for _ in range(50):
        if (await get(target, wf_id)).state == pb.WORKFLOW_STATE_SUCCEEDED:
            break
        await asyncio.sleep(0.05)
    assert (await get(target, wf_id)).state == pb.WORKFLOW_STATE_SUCCEEDED
    await w.close()
