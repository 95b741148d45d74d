"""Hostile input against a real coordinator process: refused, counted, and survived (issue 8).

Each case reproduces an attack that used to work: a result whose outputs nest 100,000 levels
deep made the coordinator exit 1; the same nesting in a submitted input came back UNKNOWN, as
did undecodable bytes. Raw protocol workers (tests/integration/protocol_worker.py) send the
hostile reports; the coordinator must stay SERVING and say which field broke which limit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait.errors import InvalidArgumentError, from_rpc_error
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from tests.integration.protocol_worker import ProtocolWorker
from tests.system import journal_check
from tests.system.harness import Cluster, handler_action, workflow

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

DEEP = "[" * 100_000 + "]" * 100_000
REFUSED = "plait_input_refused_total"


@pytest.fixture
def coordinator(cluster: Cluster) -> Iterator[Cluster]:
    cluster.start_coordinator()
    yield cluster


def assert_serving(c: Cluster) -> None:
    daemon = c.daemon("coordinator")
    assert daemon.running(), f"the coordinator exited:\n{daemon.log_tail()}"
    health = health_pb2_grpc.HealthStub(c.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def one_lease(c: Cluster, worker_id: str) -> tuple[ProtocolWorker, wpb.Lease]:
    w = ProtocolWorker(c.grpc_target, worker_id, handlers=("noop",))
    await w.connect()
    [lease] = await w.grants(1, timeout=30)
    return w, lease


async def result_ack(w: ProtocolWorker, lease: wpb.Lease) -> wpb.ResultAck:
    while True:
        ack = (await w.next("ack", timeout=30)).ack
        for r in ack.results:
            if r.lease_id == lease.lease_id:
                return r


def test_deep_outputs_fail_the_attempt_and_the_coordinator_serves_on(coordinator: Cluster) -> None:
    c = coordinator
    workflow_id = c.submit(workflow("deep-outputs", [handler_action("a", "noop")]))

    async def attack() -> wpb.ResultAck:
        w, lease = await one_lease(c, "hostile-1")
        try:
            w.finish(lease, outputs=DEEP)
            return await result_ack(w, lease)
        finally:
            await w.close()

    ack = run(attack())

    assert ack.status.code == 0, ack  # committed: as a failed attempt
    status = c.wait_workflow(workflow_id)
    [a] = status.actions
    assert a.state == pb.ACTION_STATE_FAILED, status
    assert a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], a.error
    assert "outputs_json" in a.error.message and "max_json_depth is 64" in a.error.message
    assert_serving(c)
    field = "action_finished.results[].outputs_json"
    assert c.metric(REFUSED, source="worker", field=field) == 1
    journal_check.check_sqlite_journal(Path(c.tmp) / "plait.db")


def test_oversized_outputs_name_max_output_bytes(coordinator: Cluster) -> None:
    c = coordinator
    workflow_id = c.submit(workflow("big-outputs", [handler_action("a", "noop")]))

    async def attack() -> None:
        w, lease = await one_lease(c, "hostile-2")
        try:
            w.finish(lease, outputs=json.dumps({"x": "y" * (1 << 20)}))
            await result_ack(w, lease)
        finally:
            await w.close()

    run(attack())

    [a] = c.wait_workflow(workflow_id).actions
    assert a.state == pb.ACTION_STATE_FAILED
    assert "the limit max_output_bytes is 1048576" in a.error.message, a.error
    assert_serving(c)


def test_deep_input_is_invalid_argument_naming_the_field_and_limit(coordinator: Cluster) -> None:
    c = coordinator
    action = handler_action("a", "noop")
    action.input_json = DEEP

    with pytest.raises(grpc.RpcError) as info:
        c.submit(workflow("deep-input", [action]))

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidArgumentError)
    [v] = err.violations
    assert v.field == "spec.actions[0].input_json"
    assert "the limit max_json_depth is 64" in v.description
    assert c.list_workflows() == []
    assert_serving(c)
    assert c.metric(REFUSED, source="client", field="spec.actions[].input_json") == 1


def test_undecodable_bytes_are_invalid_argument(coordinator: Cluster) -> None:
    c = coordinator
    garbage = b"\x0a\xff\xff\xff\xff\x0f"
    submit = c.channel.unary_unary(
        "/plait.v1.WorkflowService/SubmitWorkflow",
        request_serializer=lambda b: b,
        response_deserializer=wspb.SubmitWorkflowResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        submit(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "do not decode as plait.v1.SubmitWorkflowRequest" in info.value.details()  # type: ignore[attr-defined]

    # On the worker stream: a good hello, then bytes that are no ConnectRequest.
    connect = c.channel.stream_stream(
        "/plait.v1.WorkerService/Connect",
        request_serializer=lambda b: b,
        response_deserializer=wpb.ConnectResponse.FromString,
    )
    hello = wpb.ConnectRequest(hello=wpb.Hello(worker_id="garbler", slots=1, handlers=["x"]))
    with pytest.raises(grpc.RpcError) as info:
        list(connect(iter([hello.SerializeToString(), garbage]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "do not decode as plait.v1.ConnectRequest" in info.value.details()  # type: ignore[attr-defined]
    assert_serving(c)
    assert c.metric(REFUSED, source="client", field="request") == 1
    assert c.metric(REFUSED, source="worker", field="message") == 1


def test_oversized_progress_details_are_dropped_and_counted(coordinator: Cluster) -> None:
    c = coordinator
    workflow_id = c.submit(workflow("progress", [handler_action("a", "noop")]))

    async def attack() -> wpb.ResultAck:
        w, lease = await one_lease(c, "hostile-3")
        try:
            for details in ('"' + "p" * (64 * 1024) + '"', DEEP, '{"pct": 50}'):
                w.send(
                    action_progress=wpb.ActionProgress(
                        leases=[
                            wpb.LeaseProgress(
                                lease_id=lease.lease_id,
                                fencing_token=lease.fencing_token,
                                details_json=details,
                            )
                        ]
                    )
                )
            # The same lease still finishes: dropping details did not refuse the report.
            w.heartbeat()
            w.finish(lease, outputs='{"ok": true}')
            return await result_ack(w, lease)
        finally:
            await w.close()

    ack = run(attack())

    assert ack.status.code == 0, ack
    assert c.wait_workflow(workflow_id).state == pb.WORKFLOW_STATE_SUCCEEDED
    field = "action_progress.leases[].details_json"
    assert c.metric(REFUSED, source="worker", field=field) == 2
    assert_serving(c)


def test_malformed_report_ends_only_that_stream(coordinator: Cluster) -> None:
    c = coordinator
    workflow_id = c.submit(workflow("malformed", [handler_action("a", "noop")]))

    async def attack() -> grpc.aio.AioRpcError:
        w, lease = await one_lease(c, "hostile-4")
        try:
            w.finish(lease, outcome=99)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await w.next("never", timeout=30, fail_fast=True)
            return info.value
        finally:
            await w.close()

    err = run(attack())

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "action_finished.results[0].outcome" in (err.details() or "")

    async def honest() -> None:  # the lease comes back (TTL) to a worker that behaves
        w, lease = await one_lease(c, "honest")
        try:
            w.heartbeat()
            w.finish(lease, outputs='{"fine": 1}')
            await result_ack(w, lease)
        finally:
            await w.close()

    run(honest())
    assert c.wait_workflow(workflow_id).state == pb.WORKFLOW_STATE_SUCCEEDED
    assert_serving(c)


def test_tails_are_kept_to_their_end(coordinator: Cluster) -> None:
    c = coordinator
    workflow_id = c.submit(workflow("tails", [handler_action("a", "noop")]))
    tail = "x" * (200 * 1024) + "THE-END"

    async def attack() -> None:
        w, lease = await one_lease(c, "hostile-5")
        try:
            w.send(
                action_finished=wpb.ActionFinished(
                    results=[
                        wpb.ActionResult(
                            lease_id=lease.lease_id,
                            fencing_token=lease.fencing_token,
                            outcome=wpb.ACTION_OUTCOME_SUCCEEDED,
                            outputs_json="{}",
                            stdout_tail=tail,
                        )
                    ]
                )
            )
            await result_ack(w, lease)
        finally:
            await w.close()

    run(attack())

    assert c.wait_workflow(workflow_id).state == pb.WORKFLOW_STATE_SUCCEEDED
    logs = c.workflows.GetActionLogs(
        wspb.GetActionLogsRequest(workflow_id=workflow_id, action_id="a"), timeout=10
    )
    [attempt] = logs.attempts
    assert len(attempt.stdout_tail) == 64 * 1024 and attempt.stdout_tail.endswith("THE-END")
    assert c.metric(REFUSED, source="worker", field="action_finished.results[].stdout_tail") == 1


def test_a_hello_with_control_characters_in_its_hostname_is_refused(coordinator: Cluster) -> None:
    """A worker's hostname reaches operators' terminals (`plait workers`): one that holds an
    escape sequence is refused at the hello, naming the field."""
    c = coordinator

    async def attack() -> grpc.aio.AioRpcError:
        w = ProtocolWorker(c.grpc_target, "evil-host")
        w.hello.hostname = "h\x1b]0;PWNED\x07\x1b[2J"
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await w.connect()
                await w.next("never", timeout=30, fail_fast=True)
            return info.value
        finally:
            await w.close()

    err = run(attack())

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.hostname" in (err.details() or ""), err.details()
    assert "evil-host" not in c.connected_workers()
    assert_serving(c)
