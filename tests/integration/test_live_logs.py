"""FollowActionLogs against a real coordinator, fed by a hand-driven worker (real gRPC).

The worker sends exactly what a test says, so a test can play the lease's holder, a zombie
whose lease was given away, or a flood.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from plait.coordinator.live_logs import ATTEMPT_BYTES
from plait.coordinator.server import CoordinatorServer
from plait.live_logs import LOG_CHUNK_BYTES, STDOUT
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.protocol_worker import ProtocolWorker

pytestmark = pytest.mark.timeout(60)
WAIT = 20.0


def _spec() -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="logs")
    spec.actions.add(id="talk", handler="noop")
    return spec


def _logs(lease: wpb.Lease, data: bytes, offset: int, token: int | None = None) -> wpb.ActionLogs:
    return wpb.ActionLogs(
        leases=[
            wpb.LeaseLogs(
                lease_id=lease.lease_id,
                fencing_token=lease.fencing_token if token is None else token,
                chunks=[pb.LogChunk(stream=STDOUT, offset=offset, data=data)],
            )
        ]
    )


def _finish(w: ProtocolWorker, lease: wpb.Lease, stdout_tail: str) -> None:
    w.leases.pop(lease.lease_id, None)
    result = wpb.ActionResult(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        outcome=wpb.ACTION_OUTCOME_SUCCEEDED,
        outputs_json="{}",
        stdout_tail=stdout_tail,
    )
    w.send(action_finished=wpb.ActionFinished(results=[result]))


class Follow:
    """One FollowActionLogs call; its responses arrive on a queue."""

    def __init__(self, target: str, workflow_id: str, attempt: int = 0) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        stub = wsgrpc.WorkflowServiceStub(self.channel)
        self.call = stub.FollowActionLogs(
            wspb.FollowActionLogsRequest(workflow_id=workflow_id, action_id="talk", attempt=attempt)
        )
        self.responses: asyncio.Queue[wspb.FollowActionLogsResponse | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                await self.responses.put(resp)
        finally:
            await self.responses.put(None)

    async def next(self) -> wspb.FollowActionLogsResponse:
        resp = await asyncio.wait_for(self.responses.get(), WAIT)
        assert resp is not None, "the stream ended early"
        return resp

    async def rest(self) -> list[wspb.FollowActionLogsResponse]:
        out = []
        while (resp := await asyncio.wait_for(self.responses.get(), WAIT)) is not None:
            out.append(resp)
        return out

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


async def _submit(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await wsgrpc.WorkflowServiceStub(ch).SubmitWorkflow(
            wspb.SubmitWorkflowRequest(spec=_spec())
        )
        return str(resp.workflow_id)


async def test_follow_waits_streams_the_holders_output_then_ends_with_tails(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    workflow_id = await _submit(target)
    follow = Follow(target, workflow_id)  # before any worker: it waits for the attempt
    w = ProtocolWorker(target, "w1", slots=1)
    await w.connect()
    beats = asyncio.create_task(w._beat())
    try:
        (lease,) = await w.grants(1)
        report = wpb.LeaseReport(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
        w.send(action_started=wpb.ActionStarted(leases=[report]))
        w.send(action_logs=_logs(lease, b"line one\n", 0))
        first = await follow.next()
        assert (first.attempt, first.worker_id) == (1, "w1")
        assert [(c.offset, c.data) for c in first.chunks] == [(0, b"line one\n")]
        assert not first.ended
        w.send(action_logs=_logs(lease, b"line two\n", 9))
        _finish(w, lease, "line one\nline two\n")
        rest = await follow.rest()
        assert b"".join(c.data for r in rest for c in r.chunks) == b"line two\n"
        last = rest[-1]
        assert last.ended and last.action_state == pb.ACTION_STATE_SUCCEEDED
        assert last.tails.stdout_tail == "line one\nline two\n"
        # Nothing of the output was journalled; the coordinator no longer holds it either.
        assert coordinator.runtime.live_logs.total == 0
        # Following the finished action: its tails at once.
        again = Follow(target, workflow_id)
        (only,) = await again.rest()
        await again.close()
        assert only.ended and only.attempt == 1 and only.tails.stdout_tail.endswith("two\n")
    finally:
        beats.cancel()
        await follow.close()
        await w.close()


async def test_a_zombies_output_is_refused_and_never_followed(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    workflow_id = await _submit(target)
    zombie = ProtocolWorker(target, "zombie", slots=1)
    await zombie.connect()
    (old,) = await zombie.grants(1)
    chatter = asyncio.create_task(zombie.chatter())  # connected, but renews nothing
    heir = ProtocolWorker(target, "heir", slots=1)
    await heir.connect()
    beats = asyncio.create_task(heir._beat())
    follow: Follow | None = None
    try:
        (new,) = await heir.grants(1, timeout=WAIT)  # once the zombie's lease expired
        assert new.fencing_token > old.fencing_token
        follow = Follow(target, workflow_id, attempt=new.attempt)
        zombie.send(action_logs=_logs(old, b"from the zombie\n", 0))
        refused = (await zombie.next("ack", WAIT)).ack.refused
        assert [(r.lease_id, r.fencing_token) for r in refused] == [
            (old.lease_id, old.fencing_token)
        ]
        assert refused[0].status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        heir.send(action_logs=_logs(new, b"from the heir\n", 0))
        first = await follow.next()
        assert [c.data for c in first.chunks] == [b"from the heir\n"]
        _finish(heir, new, "from the heir\n")
        rest = await follow.rest()
        assert rest[-1].ended
        assert all(b"zombie" not in c.data for r in rest for c in r.chunks)
    finally:
        chatter.cancel()
        beats.cancel()
        if follow is not None:
            await follow.close()
        await zombie.close()
        await heir.close()


async def test_a_flood_is_held_within_the_attempts_window(coordinator: CoordinatorServer) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    workflow_id = await _submit(target)
    w = ProtocolWorker(target, "w1", slots=1)
    await w.connect()
    beats = asyncio.create_task(w._beat())
    follow: Follow | None = None
    try:
        (lease,) = await w.grants(1)
        block = b"x" * LOG_CHUNK_BYTES
        count = 3 * ATTEMPT_BYTES // LOG_CHUNK_BYTES
        for i in range(count):
            w.send(action_logs=_logs(lease, block, i * LOG_CHUNK_BYTES))
        w.send(action_logs=_logs(lease, b"end\n", count * LOG_CHUNK_BYTES))
        live = coordinator.runtime.live_logs
        # A heartbeat after the output: once it is acked, the output before it was handled.
        w.heartbeat()
        seq = w.hb_seq
        while (await w.next("heartbeat_ack", WAIT)).ack.heartbeat_sequence < seq:
            pass
        assert live.total + live.dropped == count * LOG_CHUNK_BYTES + 4
        assert live.total <= ATTEMPT_BYTES
        follow = Follow(target, workflow_id)
        first = await follow.next()
        assert first.chunks[0].offset > 0  # the oldest output went: a gap, not an error
        assert first.chunks[-1].data == b"end\n"
        assert sum(len(c.data) for c in first.chunks) <= ATTEMPT_BYTES
    finally:
        beats.cancel()
        if follow is not None:
            await follow.close()
        await w.close()
