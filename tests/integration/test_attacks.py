"""The attacks of the trust-boundary issue, each as a regression test that now does no harm.

A real coordinator (grpc.aio on 127.0.0.1:0, SQLite file) and workers written directly against
worker_service.proto; the "attacker" is another stream on the same host.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.protocol_worker import ProtocolWorker
from tests.integration.test_coordinator_protocol import get, history, submit

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


def chain_spec() -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="chain")
    spec.actions.add(id="a", handler="noop")
    spec.actions.add(id="b", handler="noop", needs=["a"])
    return spec


async def keep_alive(worker: ProtocolWorker) -> None:
    """Heartbeats at the test profile's cadence so the worker's leases stay live."""
    while True:
        worker.heartbeat()
        await asyncio.sleep(0.1)


def error_info(status: object) -> error_details_pb2.ErrorInfo:
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


@pytest.mark.timeout(60)
async def test_forged_reports_for_another_workers_lease_are_refused_and_not_journalled(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    real = ProtocolWorker(target, "real", slots=1)
    await real.connect()
    beats = asyncio.create_task(keep_alive(real))
    wf_id, _ = await submit(target, chain_spec())
    (lease,) = await real.grants(1)
    assert lease.action_id == "a"
    before = await history(target, wf_id)

    forger = ProtocolWorker(target, "forger", slots=1, handlers=("other",))
    await forger.connect()
    # A result, a start and progress for a lease that the forger read from GetWorkflow.
    forger.finish(lease, '{"forged": true}')
    ack = (await forger.next("ack")).ack
    refused = ack.results[0]
    assert refused.status.code == FAILED_PRECONDITION
    assert "not held by this session" in refused.status.message
    info = error_info(refused.status)
    assert info.reason == "LEASE_NOT_HELD"
    assert info.metadata["holder"] == "real" and info.metadata["lease_id"] == lease.lease_id
    forger.send(
        action_started=wpb.ActionStarted(
            leases=[wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=lease.fencing_token)]
        ),
    )
    forger.send(
        action_progress=wpb.ActionProgress(
            leases=[wpb.LeaseProgress(lease_id=lease.lease_id, fencing_token=2)]
        )
    )
    refusals: list[wpb.ResultAck] = []
    while len(refusals) < 2:
        refusals.extend((await forger.next("ack")).ack.refused)
    assert {r.lease_id for r in refusals} == {lease.lease_id}
    assert all(r.status.code == FAILED_PRECONDITION for r in refusals)
    # A guessed next token of the same action: nobody holds it.
    guessed = wpb.Lease(lease_id=f"{wf_id}/a/2", fencing_token=2)
    forger.finish(guessed, '{"forged": true}')
    guess_ack = (await forger.next("ack")).ack.results[0]
    assert guess_ack.status.code == FAILED_PRECONDITION
    assert error_info(guess_ack.status).metadata["holder"] == "nobody"

    # Nothing reached the history; the real holder still commits and b sees its output.
    assert [e.sequence for e in await history(target, wf_id)] == [e.sequence for e in before]
    real.finish(lease, '{"who": "real"}')
    real.credit(1)
    assert await first_result_code(real) == 0
    (lease_b,) = await real.grants(1)
    assert '"who":"real"' in lease_b.inputs_json.replace(" ", "")
    real.finish(lease_b)
    assert await first_result_code(real) == 0
    beats.cancel()
    status = await get(target, wf_id)
    assert status.state == pb.WORKFLOW_STATE_SUCCEEDED
    a = next(x for x in status.actions if x.action_id == "a")
    assert json.loads(a.outputs_json) == {"who": "real"}
    events = await history(target, wf_id)
    assert all(e.worker_id != "forger" for e in events)
    text = coordinator.metrics.registry.get_sample_value(
        "plait_worker_reports_refused_total", {"report": "result"}
    )
    assert text == 2
    await forger.close()
    await real.close()


@pytest.mark.timeout(60)
async def test_hello_with_a_live_worker_id_neither_evicts_nor_adopts(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    real = ProtocolWorker(target, "w1", slots=1)
    welcome = await real.connect()
    beats = asyncio.create_task(keep_alive(real))
    assert len(welcome.resume_token) >= 40
    wf_id, _ = await submit(target, chain_spec())
    (lease,) = await real.grants(1)
    report = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=lease.fencing_token, slots=1)

    impostor = ProtocolWorker(target, "w1", slots=1, running=[report])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await impostor.connect()
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'w1' is connected" in (err.value.details() or "")
    await impostor.close()
    # The wrong resume token does not help either.
    guesser = ProtocolWorker(target, "w1", slots=1, running=[report], resume_token="x" * 43)
    with pytest.raises(grpc.aio.AioRpcError) as err2:
        await guesser.connect()
    assert err2.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await guesser.close()

    # The real worker still holds its lease: its heartbeats are acked, nothing was cancelled.
    seq = real.hb_seq
    while (await real.next("heartbeat_ack")).ack.heartbeat_sequence <= seq:
        pass
    assert all(m.WhichOneof("message") != "cancel_lease" for m in list(real.inbox._queue))  # type: ignore[attr-defined]

    # The same worker reconnecting (it has the resume token) replaces the old stream, which
    # ends ABORTED naming the new session.
    again = ProtocolWorker(
        target, "w1", slots=1, running=[report], resume_token=welcome.resume_token
    )
    again.leases[lease.lease_id] = lease  # it reports the lease in its heartbeats
    welcome2 = await again.connect()
    beats.cancel()  # the old stream's heartbeats kept the lease live until the takeover
    beats2 = asyncio.create_task(keep_alive(again))
    assert [r.lease_id for r in welcome2.adopted] == [lease.lease_id]
    assert welcome2.resume_token != welcome.resume_token
    assert real._reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(real._reader, 10)
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert welcome2.session_id in (ended.value.details() or "")
    again.finish(lease, '{"who": "w1"}')
    assert await first_result_code(again) == 0
    beats2.cancel()
    await asyncio.wait_for(_until_state(target, wf_id, "a", pb.ACTION_STATE_SUCCEEDED), 10)
    await again.close()
    await real.close()


async def first_result_code(worker: ProtocolWorker) -> int:
    """The status code of the next result ack (heartbeat-only acks are skipped)."""
    while True:
        ack = (await worker.next("ack")).ack
        if ack.results:
            return int(ack.results[0].status.code)


async def _until_state(target: str, wf_id: str, action_id: str, state: int) -> None:
    while True:
        status = await get(target, wf_id)
        if any(a.action_id == action_id and a.state == state for a in status.actions):
            return
        await asyncio.sleep(0.05)


# -- with authentication on (bearer tokens over loopback) ----------------------------------


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[CoordinatorServer, dict[str, str]]]:
    """A coordinator with a token file: one token per role, and worker tokens w1 and w2."""
    tokens = {
        name: new_token() for name in ("reader", "submitter", "operator", "w1", "w2", "nobody")
    }
    roles = {
        "reader": {Role.READ},
        "submitter": {Role.SUBMIT},
        "operator": {Role.OPERATE},
        "w1": {Role.WORKER},
        "w2": {Role.WORKER},
        "nobody": {Role.READ},
    }
    path = tmp_path / "tokens.toml"
    path.write_text(
        token_file_text(
            TokenEntry(n, frozenset(roles[n]), hash_token(t))
            for n, t in tokens.items()
            if n != "nobody"
        )
    )
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/journal.db",
            metrics_listen=None,
            heartbeat_interval=timedelta(milliseconds=100),
            lease_ttl=timedelta(milliseconds=600),
            kill_grace=timedelta(milliseconds=100),
            auth_tokens=str(path),
        )
    )
    await server.start()
    try:
        yield server, tokens
    finally:
        await server.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.timeout(60)
async def test_anonymous_and_wrong_role_calls_are_refused(
    secured: tuple[CoordinatorServer, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "plait.coordinator.auth")
    server, tokens = secured
    target = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(target) as ch:
        wf = wsgrpc.WorkflowServiceStub(ch)
        admin = agrpc.AdminServiceStub(ch)
        req = wspb.SubmitWorkflowRequest(spec=chain_spec())
        with pytest.raises(grpc.aio.AioRpcError) as e1:
            await wf.SubmitWorkflow(req)
        assert e1.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "SubmitWorkflow needs role 'submit'" in (e1.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await admin.DrainWorker(apb.DrainWorkerRequest(worker_id="w1"))
        assert e2.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e3:
            await wf.SubmitWorkflow(req, metadata=bearer(tokens["nobody"]))
        assert e3.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert tokens["nobody"] not in (e3.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as e4:
            await admin.DrainWorker(
                apb.DrainWorkerRequest(worker_id="w1"), metadata=bearer(tokens["submitter"])
            )
        assert e4.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs role 'operate'" in (e4.value.details() or "")
        assert "token:submitter" in (e4.value.details() or "")
        # A worker token reads nothing.
        with pytest.raises(grpc.aio.AioRpcError) as e5:
            await wf.ListWorkflows(wspb.ListWorkflowsRequest(), metadata=bearer(tokens["w1"]))
        assert e5.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The right roles work; operate implies read.
        resp = await wf.SubmitWorkflow(req, metadata=bearer(tokens["submitter"]))
        got = await wf.GetWorkflow(
            wspb.GetWorkflowRequest(workflow_id=resp.workflow_id),
            metadata=bearer(tokens["operator"]),
        )
        assert got.workflow.workflow_id == resp.workflow_id
    assert server.runtime.state.workers == {}  # nothing connected, nothing drained
    # Counted per RPC and code; logged at WARNING once a minute per (host, RPC, code).
    sample = server.metrics.registry.get_sample_value
    labels = {"rpc": "WorkflowService.SubmitWorkflow", "code": "UNAUTHENTICATED"}
    assert sample("plait_auth_refusals_total", labels) == 2  # anonymous, then a bad token
    drain = {"rpc": "AdminService.DrainWorker", "code": "PERMISSION_DENIED"}
    assert sample("plait_auth_refusals_total", drain) == 1
    refused = [r for r in caplog.records if "refused WorkflowService.SubmitWorkflow" in r.message]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert tokens["nobody"] not in caplog.text


@pytest.mark.timeout(60)
async def test_worker_identity_comes_from_its_token(
    secured: tuple[CoordinatorServer, dict[str, str]],
) -> None:
    server, tokens = secured
    target = f"127.0.0.1:{server.port}"
    anonymous = ProtocolWorker(target, "w1")
    with pytest.raises(grpc.aio.AioRpcError) as e0:
        await anonymous.connect()
    assert e0.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await anonymous.close()
    # w2's token cannot say hello as w1.
    liar = ProtocolWorker(target, "w1", metadata=bearer(tokens["w2"]))
    with pytest.raises(grpc.aio.AioRpcError) as e1:
        await liar.connect()
    assert e1.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = e1.value.details() or ""
    assert "'w1'" in details and "'w2'" in details
    await liar.close()
    # A submit token cannot serve as a worker at all.
    submitter = ProtocolWorker(target, "w1", metadata=bearer(tokens["submitter"]))
    with pytest.raises(grpc.aio.AioRpcError) as e2:
        await submitter.connect()
    assert e2.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await submitter.close()

    first = ProtocolWorker(target, "w1", metadata=bearer(tokens["w1"]))
    await first.connect()
    # Authenticated as w1, a new stream (a restarted w1 on another host, say) takes over.
    second = ProtocolWorker(target, "w1", metadata=bearer(tokens["w1"]))
    welcome = await second.connect()
    assert first._reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(first._reader, 10)
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert welcome.session_id in (ended.value.details() or "")
    await first.close()
    await second.close()


@pytest.mark.timeout(60)
async def test_token_file_reload_revokes_and_a_bad_file_keeps_the_old_tokens(
    secured: tuple[CoordinatorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, tokens = secured
    target = f"127.0.0.1:{server.port}"
    path = Path(server.config.auth_tokens or "")
    original = path.read_text()
    async with grpc.aio.insecure_channel(target) as ch:
        wf = wsgrpc.WorkflowServiceStub(ch)
        call = wf.ListWorkflows
        await call(wspb.ListWorkflowsRequest(), metadata=bearer(tokens["reader"]))
        path.write_text("[[tokens]]\nname = 'broken'\n")
        server.reload_credentials()  # refused: the old tokens stay in force
        await call(wspb.ListWorkflowsRequest(), metadata=bearer(tokens["reader"]))
        # Revoke "reader" (the file without its entry), as `plait tokens revoke` would.
        kept = [line for line in original.split("\n[[tokens]]") if 'name = "reader"' not in line]
        path.write_text("\n[[tokens]]".join(kept))
        server.reload_credentials()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(wspb.ListWorkflowsRequest(), metadata=bearer(tokens["reader"]))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await call(wspb.ListWorkflowsRequest(), metadata=bearer(tokens["operator"]))


@pytest.mark.timeout(30)
async def test_a_second_hello_on_a_stream_ends_it_as_a_protocol_error(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "twice", slots=1)
    await w.connect()
    w.send(hello=wpb.Hello(worker_id="twice", slots=1, handlers=["noop"]))
    assert w._reader is not None
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(w._reader, 10)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "second hello" in (ended.value.details() or "")
    await w.close()


@pytest.mark.timeout(30)
async def test_a_per_worker_metric_series_lives_only_while_its_worker_is_connected(
    coordinator: CoordinatorServer,
) -> None:
    # Worker ids are the client's choice: a process that connects under ever new ids must not
    # grow the label set of plait_clock_offset_rejections_total without bound.
    target = f"127.0.0.1:{coordinator.port}"
    sample = coordinator.metrics.registry.get_sample_value
    series = ("plait_clock_offset_rejections_total", {"worker": "skewed"})
    w = ProtocolWorker(target, "skewed", slots=1)
    await w.connect()
    w.hb_seq += 1
    ahead = wpb.ConnectRequest(heartbeat=wpb.Heartbeat(sequence=w.hb_seq))
    w.hlc.stamp(ahead.hlc)
    ahead.hlc.physical_ms += 3_600_000  # an hour ahead: not merged, counted for this worker
    w.outbox.put_nowait(ahead)
    await w.next("heartbeat_ack")  # delivered after the batch's observations were recorded
    assert (sample(*series) or 0) >= 1
    await w.close()
    for _ in range(200):  # the stream's end reaches the core, then the metrics
        if sample(*series) is None:
            break
        await asyncio.sleep(0.05)
    assert sample(*series) is None, "the series outlived its worker"
