"""The plaintext health port (``--health-listen``): what Kubernetes' grpc probes see.

A leader and a standby on one journal, each with its health port: readiness (service ``""``)
is SERVING on the leader alone, liveness (``liveness``) on both; the port answers
``Health/Check`` and nothing else (no ``Watch``, no Plait service), and the main port keeps
its TLS-or-not as configured. Real servers on real sockets.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait.coordinator.config import CoordinatorConfig, build_parser, load_config
from plait.coordinator.health_port import LIVENESS_SERVICE
from plait.coordinator.server import CoordinatorServer
from plait.errors import ConfigError
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config(tmp_path: Path, name: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path}/journal.db",
        metrics_listen=None,
        health_listen="127.0.0.1:0",
        ready_file=str(tmp_path / f"{name}.ready.json"),
    )


async def check(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(resp.status)


@pytest.mark.timeout(60)
async def test_readiness_on_the_leader_only_liveness_on_both(tmp_path: Path) -> None:
    leader = CoordinatorServer(config(tmp_path, "leader"))
    await leader.start()
    standby = CoordinatorServer(config(tmp_path, "standby"))
    await standby.start(wait_leader=False)
    try:
        lp, sp = leader.health_port.port, standby.health_port.port
        assert lp and sp and lp != leader.port
        assert await check(lp) == SERVING
        assert await check(lp, "plait.v1.WorkflowService") == SERVING
        assert await check(lp, LIVENESS_SERVICE) == SERVING
        assert await check(sp) == NOT_SERVING
        assert await check(sp, LIVENESS_SERVICE) == SERVING
        # The same answers as the main port gives.
        assert await check(standby.port) == NOT_SERVING
        assert await check(standby.port, LIVENESS_SERVICE) == SERVING
        ready = json.loads((tmp_path / "leader.ready.json").read_text())
        assert ready["health"] == f"127.0.0.1:{lp}"
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await check(lp, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        await leader.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):  # stopped: the port is gone
            await check(lp, LIVENESS_SERVICE)
        await standby.leading.wait()
        assert await check(sp) == SERVING
    finally:
        await standby.stop(0)
        await leader.stop(0)


@pytest.mark.timeout(60)
async def test_only_check_is_served(tmp_path: Path) -> None:
    server = CoordinatorServer(config(tmp_path, "one"))
    await server.start()
    try:
        target = f"127.0.0.1:{server.health_port.port}"
        async with grpc.aio.insecure_channel(target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as watched:
                await watch.read()
            assert watched.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as listed:
                await wsgrpc.WorkflowServiceStub(ch).ListWorkflows(
                    wspb.ListWorkflowsRequest(), timeout=10
                )
            assert listed.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # A request over the port's bound is refused, not read.
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="x" * 10_000), timeout=10
                )
            assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


async def test_shutdown_says_not_serving_before_the_port_closes(tmp_path: Path) -> None:
    server = CoordinatorServer(config(tmp_path, "one"))
    await server.start()
    port = server.health_port.port
    await server.health.enter_graceful_shutdown()  # what stop() does first
    try:
        assert await check(port, LIVENESS_SERVICE) == NOT_SERVING
        assert await check(port) == NOT_SERVING
    finally:
        await server.stop(0)


def test_the_flag_env_and_off() -> None:
    parse = build_parser().parse_args
    cfg = load_config(parse(["--health-listen", "0.0.0.0:7460"]), environ={})
    assert cfg.health_listen == "0.0.0.0:7460"  # beyond loopback without TLS: it is allowed
    env = {"PLAIT_HEALTH_LISTEN": "off"}
    assert load_config(parse([]), environ=env).health_listen is None
    assert load_config(parse([]), environ={}).health_listen is None  # off by default
    with pytest.raises(ConfigError, match="health_listen 'nope': expected HOST:PORT"):
        load_config(parse(["--health-listen", "nope"]), environ={})


async def test_a_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    first = CoordinatorServer(config(tmp_path, "first"))
    await first.start()
    try:
        taken = f"127.0.0.1:{first.health_port.port}"
        cfg = CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/other.db",
            metrics_listen=None,
            health_listen=taken,
        )
        second = CoordinatorServer(cfg)
        with pytest.raises(ConfigError, match=f"--health-listen {taken}: cannot listen there"):
            await second.start()
    finally:
        await first.stop(0)
