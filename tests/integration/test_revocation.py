"""Revoking a worker id: cut off now, leases run elsewhere, refused until reinstated, durable."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from plait.cli.main import main as plait_main
from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import workflow_pb2 as pb
from tests.integration.protocol_worker import ProtocolWorker
from tests.integration.test_attacks import keep_alive
from tests.integration.test_coordinator_protocol import history, submit


def _config(tmp_path: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path}/journal.db",
        metrics_listen=None,
        heartbeat_interval=timedelta(milliseconds=100),
        lease_ttl=timedelta(milliseconds=600),
        kill_grace=timedelta(milliseconds=100),
    )


@pytest.mark.timeout(90)
async def test_revoke_cuts_a_worker_off_durably_until_reinstated(tmp_path: Path) -> None:
    server = CoordinatorServer(_config(tmp_path))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    suspect = ProtocolWorker(target, "w3", slots=1)
    await suspect.connect()
    beats = asyncio.create_task(keep_alive(suspect))
    spec = pb.WorkflowSpec(name="one")
    spec.actions.add(id="a", handler="noop")
    wf_id, _ = await submit(target, spec)
    (lease,) = await suspect.grants(1)

    async with grpc.aio.insecure_channel(target) as ch:
        admin = agrpc.AdminServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.RevokeWorker(apb.RevokeWorkerRequest(worker_id="w3", reason="x" * 2000))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason" in (bad.value.details() or "")
        resp = await admin.RevokeWorker(
            apb.RevokeWorkerRequest(worker_id="w3", reason="host compromised")
        )
    assert resp.was_connected and resp.leases_requeued == 1
    # The worker is told to stop the attempt, then its stream ends PERMISSION_DENIED.
    cancel = await suspect.next("cancel_lease")
    assert cancel.cancel_lease.leases[0].lease_id == lease.lease_id
    assert suspect._reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(suspect._reader, 10)
    beats.cancel()
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "host compromised" in (ended.value.details() or "")
    await suspect.close()

    # Its action runs elsewhere with the next token; the loss is not charged to the budget.
    helper = ProtocolWorker(target, "w4", slots=1)
    await helper.connect()
    (again,) = await helper.grants(1)
    assert again.action_id == "a" and again.fencing_token == 2
    events = await history(target, wf_id)
    lost = [e for e in events if e.type == pb.EVENT_TYPE_LEASE_LOST]
    assert len(lost) == 1 and "worker revoked: host compromised" in lost[0].message
    assert server.runtime.state.workflows[wf_id].actions["a"].lease_losses == 0
    await helper.close()

    # The id is refused, also after a restart (the revocation is in the journal's store).
    for attempt in range(2):
        back = ProtocolWorker(target, "w3", slots=1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await back.connect()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "is revoked" in (refused.value.details() or "")
        await back.close()
        if attempt == 0:
            await server.stop(0)
            server = CoordinatorServer(_config(tmp_path))
            await server.start()
            target = f"127.0.0.1:{server.port}"
    assert server.metrics.registry.get_sample_value("plait_workers_revoked") == 1

    # The CLI lists it, and reinstates it.
    listing = await asyncio.to_thread(
        plait_main, ["--coordinator", target, "workers", "-o", "json"]
    )
    assert listing == 0
    code = await asyncio.to_thread(plait_main, ["--coordinator", target, "reinstate", "w3"])
    assert code == 0
    welcome = await (w3 := ProtocolWorker(target, "w3", slots=1)).connect()
    assert welcome.session_id
    await w3.close()
    await server.stop(0)


@pytest.mark.timeout(60)
async def test_revoke_and_reinstate_from_the_cli(
    coordinator: CoordinatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    args = ["--coordinator", target]
    assert await asyncio.to_thread(plait_main, [*args, "revoke", "w9", "--reason", "lost"]) == 0
    assert "w9: revoked (not connected; 0 lease(s) queued again)" in capsys.readouterr().out
    assert await asyncio.to_thread(plait_main, [*args, "workers"]) == 0
    out = capsys.readouterr().out
    assert "revoked" in out and "w9" in out and "lost" in out
    assert await asyncio.to_thread(plait_main, [*args, "reinstate", "w9"]) == 0
    assert "w9: reinstated" in capsys.readouterr().out
    assert await asyncio.to_thread(plait_main, [*args, "reinstate", "w9"]) == 0
    assert "w9: was not revoked" in capsys.readouterr().out
    assert await asyncio.to_thread(plait_main, [*args, "revoke", "../etc"]) == 2
