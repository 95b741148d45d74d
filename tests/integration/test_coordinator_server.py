"""The coordinator as a server: health, reflection, metrics, graceful shutdown, bad streams."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc
from plait.v1 import workflow_pb2 as pb
from tests.integration.protocol_worker import ProtocolWorker
from tests.integration.test_coordinator_protocol import get, submit


async def test_health_serving_then_not_serving_on_shutdown(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/j.db", metrics_listen=None
        )
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "plait.v1.WorkflowService", "plait.v1.WorkerService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(0.5))
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


async def _reflected_services(port: int) -> set[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for resp in stub.ServerReflectionInfo(ask()):
            names |= {s.name for s in resp.list_services_response.service}
        return names


async def test_reflection_is_off_by_default(coordinator: CoordinatorServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reflected_services(coordinator.port)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_lists_every_service_when_asked(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/j.db",
            metrics_listen=None,
            reflection=True,
        )
    )
    await server.start()
    try:
        names = await _reflected_services(server.port)
    finally:
        await server.stop(0)
    assert {
        "plait.v1.WorkflowService",
        "plait.v1.WorkerService",
        "plait.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names


async def test_metrics_count_what_happened(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "w1", slots=2)
    await w.connect()
    spec = pb.WorkflowSpec(name="m")
    spec.actions.add(id="ok", handler="noop")
    spec.actions.add(id="bad", handler="noop")
    wf_id, _ = await submit(target, spec)
    for lease in await w.grants(2):
        if lease.action_id == "ok":
            w.finish(lease, '{"v": 1}')
        else:
            w.finish(lease, outcome=wpb.ACTION_OUTCOME_FAILED)
    for _ in range(50):
        if (await get(target, wf_id)).state != pb.WORKFLOW_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{coordinator.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['plait_actions_finished_total{state="succeeded"}'] == 1
    assert samples['plait_actions_finished_total{state="failed"}'] == 1
    assert samples['plait_workflows_finished_total{state="failed"}'] == 1
    assert samples["plait_leases_granted_total"] == 2
    assert samples["plait_workers_connected"] == 1
    assert samples["plait_action_duration_seconds_count"] == 2
    assert samples["plait_journal_commit_seconds_count"] >= 1
    assert "# TYPE plait_results_refused_total counter" in text
    assert "plait_stale_results_refused_total" not in text  # replaced by the one with reasons
    assert not [name for name in samples if "_created" in name]
    await w.close()


async def test_graceful_shutdown_drains_connected_workers(tmp_path: Path) -> None:
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/j.db",
            metrics_listen=None,
            heartbeat_interval=timedelta(milliseconds=100),
            lease_ttl=timedelta(seconds=1),
            kill_grace=timedelta(milliseconds=100),
        )
    )
    await server.start()
    w = ProtocolWorker(f"127.0.0.1:{server.port}", "w1")
    await w.connect()
    stopping = asyncio.create_task(server.stop(5))
    drain = await w.next("drain")
    assert drain.drain.reason
    w.send(goodbye=wpb.Goodbye(reason="drained"))
    await w.close()
    await asyncio.wait_for(stopping, 5)  # returns once the worker left, well before the grace


@pytest.mark.parametrize(
    ("first", "field"),
    [
        (wpb.ConnectRequest(credit=wpb.Credit(slots=1)), "message"),
        (wpb.ConnectRequest(hello=wpb.Hello(worker_id="../w", slots=1)), "hello.worker_id"),
        (wpb.ConnectRequest(hello=wpb.Hello(worker_id="w", slots=0)), "hello.slots"),
    ],
)
async def test_bad_first_message_is_refused_naming_the_field(
    coordinator: CoordinatorServer, first: wpb.ConnectRequest, field: str
) -> None:
    refused = asyncio.Event()  # the request stream stays open until the call has ended
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as ch:

        async def requests() -> object:
            yield first
            await refused.wait()

        call = wgrpc.WorkerServiceStub(ch).Connect(requests())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        refused.set()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (info.value.details() or "")
