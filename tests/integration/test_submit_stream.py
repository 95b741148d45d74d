"""A spec larger than one message goes in pieces (SubmitWorkflowStream), against a real
coordinator in this process: journalled once and whole, the same idempotency answers as
SubmitWorkflow, and refusals naming ``spec_chunk`` and ``max_spec_bytes``."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from plait.client import Client
from plait.coordinator.config import CoordinatorConfig, Limits
from plait.coordinator.server import CoordinatorServer
from plait.submission import STREAM_ABOVE_BYTES
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

pytestmark = pytest.mark.timeout(120)

MAX_SPEC = 8 * 1024 * 1024


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path}/journal.db",
        heartbeat_interval=timedelta(milliseconds=200),
        lease_ttl=timedelta(seconds=2),
        kill_grace=timedelta(milliseconds=200),
    )
    s = CoordinatorServer(replace(config, limits=replace(Limits(), max_spec_bytes=MAX_SPEC)))
    await s.start()
    try:
        yield s
    finally:
        await s.stop(0)


def big_spec(n: int = 12_000) -> pb.WorkflowSpec:
    """Over one message: ``n`` handler actions with about 400 bytes of input each."""
    spec = pb.WorkflowSpec(name="big")
    spec.env["MODE"] = "fast"
    pad = "x" * 380
    for i in range(n):
        spec.actions.add(id=f"a{i}", handler="h", input_json=f'{{"i":{i},"pad":"{pad}"}}')
    return spec


async def test_a_spec_over_one_message_is_streamed_and_stored_whole(
    server: CoordinatorServer,
) -> None:
    spec = big_spec()
    assert spec.ByteSize() > STREAM_ABOVE_BYTES
    with Client(f"127.0.0.1:{server.port}", tls=False, token="") as client:
        first = await asyncio.to_thread(client.submit, spec, "the-key")
        again = await asyncio.to_thread(client.submit, spec, "the-key")
        status = await asyncio.to_thread(client.get, first.workflow_id)
        # Its history still fits a watch: the submitted event comes without the spec.
        history = await asyncio.to_thread(
            lambda: list(client.watch(first.workflow_id, follow=False))
        )
    assert history[0].type == pb.EVENT_TYPE_WORKFLOW_SUBMITTED
    assert not history[0].HasField("spec")
    # The collector, paused while the big submission was built, runs again soon after.
    for _ in range(500):
        if gc.isenabled():
            break
        await asyncio.sleep(0.01)
    assert gc.isenabled()
    assert first.created and not again.created  # the same key finds the same workflow
    assert again.workflow_id == first.workflow_id
    assert sum(status.action_counts.values()) == 12_000
    stored = server.runtime.state.workflows[first.workflow_id].spec
    assert stored == spec  # every piece, in order, and the env with them


def _pieces(
    header: wspb.SubmitWorkflowRequest, chunks: list[bytes]
) -> Iterator[wspb.SubmitWorkflowStreamRequest]:
    yield wspb.SubmitWorkflowStreamRequest(header=header, spec_chunk=chunks[0] if chunks else b"")
    for c in chunks[1:]:
        yield wspb.SubmitWorkflowStreamRequest(spec_chunk=c)


async def _stream(server: CoordinatorServer, chunks: list[bytes]) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = wsgrpc.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
        header = wspb.SubmitWorkflowRequest(idempotency_key="k")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitWorkflowStream(_pieces(header, chunks), timeout=60)
    return err.value


async def test_pieces_past_max_spec_bytes_are_refused_naming_the_limit(
    server: CoordinatorServer,
) -> None:
    chunk = b"\0" * (1024 * 1024)
    err = await _stream(server, [chunk] * 9)  # 9 MiB > 8 MiB
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec_chunk" in (err.details() or "")
    assert f"the limit max_spec_bytes is {MAX_SPEC}" in (err.details() or "")
    assert not server.runtime.state.workflows  # nothing stored


async def test_pieces_that_are_no_spec_are_refused(server: CoordinatorServer) -> None:
    err = await _stream(server, [b"\xff\xff\xff"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not decode as a WorkflowSpec" in (err.details() or "")
    valid_but_flawed = pb.WorkflowSpec(name="x").SerializeToString()  # no actions
    err = await _stream(server, [valid_but_flawed])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one action" in (err.details() or "")
    assert not server.runtime.state.workflows
