"""The safety net: an exception while the core handles one stimulus ends only that RPC or stream.

There is no known input that makes the core raise any more (that is what the limits and the
fuzz suite are for), so these tests inject the bug: a core handler is patched to change some
state and then raise, as a real bug would, leaving the in-memory state half applied. The
coordinator must answer that one call INTERNAL (or end that one stream), rebuild its state
from the journal, keep every other worker's stream and lease, and keep serving; a core that
keeps raising stops the process with a clear message instead of looping.

The coordinator is a real in-process server (grpc.aio on 127.0.0.1:0, SQLite file) spoken to
by raw protocol workers over real streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.core import results
from plait.coordinator.core.state import SchedulerState
from plait.coordinator.server import CoordinatorServer
from plait.coordinator.services import workflow as service
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.protocol_worker import ProtocolWorker
from tests.system import journal_check

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    s = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/journal.db",
            metrics_listen=None,
            heartbeat_interval=timedelta(seconds=1),
            lease_ttl=timedelta(seconds=10),
            kill_grace=timedelta(seconds=1),
        )
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop(0)


class Client:
    def __init__(self, server: CoordinatorServer) -> None:
        self.target = f"127.0.0.1:{server.port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = wsgrpc.WorkflowServiceStub(self.channel)

    async def submit(self, name: str) -> str:
        spec = pb.WorkflowSpec(name=name, actions=[pb.ActionSpec(id="a", handler="noop")])
        reply = await self.stub.SubmitWorkflow(wspb.SubmitWorkflowRequest(spec=spec))
        return str(reply.workflow_id)

    async def state(self, workflow_id: str) -> int:
        reply = await self.stub.GetWorkflow(wspb.GetWorkflowRequest(workflow_id=workflow_id))
        return int(reply.workflow.state)

    async def wait_state(self, workflow_id: str, state: int) -> None:
        """Follows the history until the workflow finishes, then checks how it ended."""
        async with asyncio.timeout(30):
            watch = self.stub.WatchWorkflow(
                wspb.WatchWorkflowRequest(workflow_id=workflow_id, follow=True)
            )
            async for reply in watch:
                if any(e.type == pb.EVENT_TYPE_WORKFLOW_FINISHED for e in reply.events):
                    break
        assert await self.state(workflow_id) == state


async def acked(w: ProtocolWorker, lease: wpb.Lease) -> wpb.ResultAck:
    while True:
        for r in (await w.next("ack", timeout=30)).ack.results:
            if r.lease_id == lease.lease_id:
                return r


def sample(server: CoordinatorServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels or None) or 0.0


def check_journal(tmp_path: Path) -> None:
    journal_check.check_journal(
        journal_check.read_sqlite(tmp_path / "journal.db"), require_finished=False
    )


async def test_a_failing_rpc_ends_only_itself_and_half_applied_state_is_rebuilt(
    server: CoordinatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(server)
    held = await client.submit("held")
    w = ProtocolWorker(client.target, "bystander", slots=1)
    await w.connect()
    [lease] = await w.grants(1)
    victim = await client.submit("victim")

    original = SchedulerState.on_cancel

    def buggy(self: SchedulerState, s: Any, out: Any) -> None:
        if s.reason == "boom":
            self.workflows[s.workflow_id].cancel_requested = True  # half applied...
            raise RuntimeError("injected bug")  # ...then the bug
        original(self, s, out)

    monkeypatch.setattr(SchedulerState, "on_cancel", buggy)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.CancelWorkflow(
            wspb.CancelWorkflowRequest(workflow_id=victim, reason="boom")
        )
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "internal error handling CancelRequested" in (info.value.details() or "")

    # The bystander's stream and lease survived the rebuild: its result commits.
    w.heartbeat()
    w.finish(lease, outputs='{"ok": 1}')
    assert (await acked(w, lease)).status.code == 0
    await client.wait_state(held, pb.WORKFLOW_STATE_SUCCEEDED)
    # The rebuilt state is the journal's: the half-applied flag is gone, a real cancel works.
    await client.stub.CancelWorkflow(wspb.CancelWorkflowRequest(workflow_id=victim, reason="ok"))
    await client.wait_state(victim, pb.WORKFLOW_STATE_CANCELLED)
    assert sample(server, "plait_core_rebuilds_total") == 1
    assert sample(server, "plait_internal_errors_total", where="core") == 1
    assert server.fatal is None and not server.stopped.is_set()
    await w.close()
    await client.channel.close()
    check_journal(tmp_path)


async def test_a_failing_report_ends_only_its_stream(
    server: CoordinatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(server)
    first = await client.submit("first")
    honest = ProtocolWorker(client.target, "honest", slots=1)
    await honest.connect()
    [kept] = await honest.grants(1)
    second = await client.submit("second")
    poisoner = ProtocolWorker(client.target, "poisoner", slots=1)
    await poisoner.connect()
    [poisoned] = await poisoner.grants(1)

    original = results.on_result

    def buggy(st: SchedulerState, w: Any, session_id: str, res: Any, remote: Any, out: Any) -> None:
        if "poison" in res.outputs_json:
            lease = st.leases[res.lease_id]
            del w.leases[lease.lease_id]  # half applied: the worker no longer holds it...
            raise KeyError("injected bug")
        original(st, w, session_id, res, remote, out)

    monkeypatch.setattr(results, "on_result", buggy)
    poisoner.finish(poisoned, outputs='{"poison": 1}')
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await poisoner.next("never", timeout=30, fail_fast=True)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    await poisoner.close()

    honest.heartbeat()
    honest.finish(kept, outputs='{"ok": 1}')
    assert (await acked(honest, kept)).status.code == 0
    await client.wait_state(first, pb.WORKFLOW_STATE_SUCCEEDED)
    await honest.close()

    # The poisoner comes back with the attempt it still holds, re-adopts it, reports well.
    back = ProtocolWorker(
        client.target,
        "poisoner",
        slots=1,
        running=[
            wpb.LeaseReport(
                lease_id=poisoned.lease_id, fencing_token=poisoned.fencing_token, slots=1
            )
        ],
    )
    welcome = await back.connect()
    assert [r.lease_id for r in welcome.adopted] == [poisoned.lease_id]
    back.leases[poisoned.lease_id] = poisoned
    back.heartbeat()
    back.finish(poisoned, outputs='{"fine": 1}')
    assert (await acked(back, poisoned)).status.code == 0
    await client.wait_state(second, pb.WORKFLOW_STATE_SUCCEEDED)
    await back.close()
    await client.channel.close()
    assert server.fatal is None
    check_journal(tmp_path)


async def test_a_core_that_keeps_failing_stops_the_coordinator(
    server: CoordinatorServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def always(self: SchedulerState, out: Any) -> None:
        raise RuntimeError("injected: every tick fails")

    caplog.set_level(logging.CRITICAL, logger="plait.coordinator.runtime")
    monkeypatch.setattr(SchedulerState, "on_time_passed", always)
    async with asyncio.timeout(30):
        await server.stopped.wait()

    assert server.fatal is not None
    assert "raised 4 times within 60s" in caplog.text, caplog.text


async def test_a_servicer_exception_is_internal_for_that_rpc_only(
    server: CoordinatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(server)
    workflow_id = await client.submit("seen")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(service, "check_workflow_id", broken)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.GetWorkflow(wspb.GetWorkflowRequest(workflow_id=workflow_id))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == (
        "internal error in GetWorkflow (ZeroDivisionError); the coordinator logged it"
    )
    assert sample(server, "plait_internal_errors_total", where="GetWorkflow") == 1
    monkeypatch.undo()
    assert await client.state(workflow_id) == pb.WORKFLOW_STATE_RUNNING
    await client.channel.close()
