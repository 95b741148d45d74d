"""Two coordinators on one SQLite journal: one leads, the other waits as a standby."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.errors import leader_hint
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.test_coordinator_protocol import get, submit


def config(tmp_path: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/journal.db", metrics_listen=None
    )


async def health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        return int(resp.status)


@pytest.mark.timeout(30)
async def test_standby_names_the_leader_then_takes_over_with_the_history(
    tmp_path: Path,
) -> None:
    leader = CoordinatorServer(config(tmp_path))
    await leader.start()
    standby = CoordinatorServer(config(tmp_path))
    await standby.start(wait_leader=False)
    try:
        assert await health(leader.port) == health_pb2.HealthCheckResponse.SERVING
        assert await health(standby.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        spec = pb.WorkflowSpec(name="kept")
        spec.actions.add(id="a", handler="h")
        wf_id, _ = await submit(f"127.0.0.1:{leader.port}", spec, key="k1")
        await asyncio.sleep(0.6)  # the standby refreshes its hint of the leader
        async with grpc.aio.insecure_channel(f"127.0.0.1:{standby.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await wsgrpc.WorkflowServiceStub(ch).GetWorkflow(
                    wspb.GetWorkflowRequest(workflow_id=wf_id)
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(info.value)
        assert status is not None and leader_hint(status) == f"127.0.0.1:{leader.port}"
        await leader.stop(0)
        await asyncio.wait_for(standby.leading.wait(), 5)
        assert standby.term == leader.term + 1
        assert await health(standby.port) == health_pb2.HealthCheckResponse.SERVING
        status_after = await get(f"127.0.0.1:{standby.port}", wf_id)
        assert status_after.state == pb.WORKFLOW_STATE_RUNNING
        again = await submit(f"127.0.0.1:{standby.port}", spec, key="k1")
        assert again == (wf_id, False)  # the idempotency key survived the takeover
    finally:
        await standby.stop(0)
        await leader.stop(0)


async def test_hlc_never_goes_backwards_across_restarts(tmp_path: Path) -> None:
    from plait.clock import SystemClock

    first = CoordinatorServer(config(tmp_path))
    await first.start()
    spec = pb.WorkflowSpec(name="x")
    spec.actions.add(id="a", handler="h")
    await submit(f"127.0.0.1:{first.port}", spec)
    high = first.runtime.state.hlc.now()
    await first.stop(0)
    # The successor's wall clock is ten minutes behind.
    second = CoordinatorServer(config(tmp_path), clock=SystemClock(offset_ms=-600_000))
    await second.start()
    try:
        assert second.runtime.state.hlc.now() > high
        wf_id, _ = await submit(f"127.0.0.1:{second.port}", spec)
        events = second.runtime.state.workflows[wf_id]
        assert events.submitted_hlc > high
    finally:
        await second.stop(0)


async def test_standby_refuses_worker_streams_naming_the_leader(tmp_path: Path) -> None:
    from plait.v1 import worker_service_pb2 as wpb
    from plait.v1 import worker_service_pb2_grpc as wgrpc

    leader = CoordinatorServer(config(tmp_path))
    await leader.start()
    standby = CoordinatorServer(config(tmp_path))
    await standby.start(wait_leader=False)
    try:
        await asyncio.sleep(0.6)
        refused = asyncio.Event()  # the request stream stays open until the call has ended
        async with grpc.aio.insecure_channel(f"127.0.0.1:{standby.port}") as ch:

            async def hello() -> object:
                yield wpb.ConnectRequest(hello=wpb.Hello(worker_id="w1", slots=1, handlers=["h"]))
                await refused.wait()

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in wgrpc.WorkerServiceStub(ch).Connect(hello()):
                    pass
            refused.set()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(info.value)
        assert status is not None and leader_hint(status) == f"127.0.0.1:{leader.port}"
    finally:
        await standby.stop(0)
        await leader.stop(0)


async def test_finished_workflows_are_pruned_after_retention(tmp_path: Path) -> None:
    from datetime import timedelta

    from tests.integration.protocol_worker import ProtocolWorker

    cfg = config(tmp_path)
    server = CoordinatorServer(
        CoordinatorConfig(
            listen=cfg.listen,
            store=cfg.store,
            metrics_listen=None,
            retention=timedelta(milliseconds=500),
        )
    )
    await server.start()
    target = f"127.0.0.1:{server.port}"
    worker = ProtocolWorker(target, "w1", slots=1)
    try:
        await worker.connect()
        spec = pb.WorkflowSpec(name="short-lived")
        spec.actions.add(id="a", handler="noop")
        done_id, _ = await submit(target, spec, key="gone")
        (lease,) = await worker.grants(1)
        worker.finish(lease)
        kept = pb.WorkflowSpec(name="still-running")
        kept.actions.add(id="b", handler="other")  # nobody serves it: stays READY
        kept_id, _ = await submit(target, kept)
        for _ in range(60):
            if done_id not in server.runtime.state.workflows:
                break
            await asyncio.sleep(0.1)
        assert done_id not in server.runtime.state.workflows
        for _ in range(30):
            if not await server.store.read(done_id):
                break
            await asyncio.sleep(0.1)
        assert await server.store.read(done_id) == []
        assert (await get(target, kept_id)).state == pb.WORKFLOW_STATE_RUNNING
        assert await server.store.read(kept_id)
    finally:
        await worker.close()
        await server.stop(0)
