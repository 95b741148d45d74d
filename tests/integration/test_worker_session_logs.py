"""Live logs from a real WorkerSession and its exec executor (real processes, real gRPC) to an
in-test coordinator that records every message: output goes out while the attempt runs, its
rest before its result, and a flood is coalesced and bounded without slowing the attempt; an SDK
handler's ``ctx.log`` lines likewise."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from plait.live_logs import LOG_CHUNK_BYTES, LOG_INTERVAL, STDOUT
from plait.v1 import worker_service_pb2 as pb
from plait.worker import ActionContext, SessionConfig, Worker, WorkerSession
from tests.integration.worker_session_support import (
    Harness,
    connected,
    exec_lease,
    handler_lease,
)

pytestmark = pytest.mark.timeout(60)


def _logs(received: list[pb.ConnectRequest]) -> list[tuple[int, bytes]]:
    """Every (offset, data) of stdout sent, in stream order."""
    return [
        (c.offset, c.data)
        for m in received
        if m.WhichOneof("message") == "action_logs"
        for entry in m.action_logs.leases
        for c in entry.chunks
        if c.stream == STDOUT
    ]


def _finished_at(received: list[pb.ConnectRequest]) -> int:
    return next(i for i, m in enumerate(received) if m.WhichOneof("message") == "action_finished")


async def test_output_is_sent_while_the_attempt_runs_and_its_rest_before_the_result(
    h: Harness, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = 'echo one; while [ ! -e "$1" ]; do sleep 0.02; done; echo two'
    h.start_session(slots=1)
    stream = await connected(h)
    stream.grant(exec_lease(["/bin/sh", "-c", script, "sh", str(gate)], "wf/talk/1"))
    await h.coord.wait_for(lambda: _logs(stream.received))
    assert _logs(stream.received) == [(0, b"one\n")]
    assert not stream.results  # still running: it waits for the gate
    (entry,) = next(m for m in stream.received if m.HasField("action_logs")).action_logs.leases
    assert (entry.lease_id, entry.fencing_token) == ("wf/talk/1", 1)
    gate.touch()
    await h.coord.wait_for(lambda: stream.results)
    assert _logs(stream.received) == [(0, b"one\n"), (4, b"two\n")]
    last_logs = max(i for i, m in enumerate(stream.received) if m.HasField("action_logs"))
    assert last_logs < _finished_at(stream.received)
    assert stream.results[0].stdout_tail == "one\ntwo\n"


async def test_a_flood_is_coalesced_and_bounded(h: Harness) -> None:
    size = 30_000_000
    h.start_session(slots=1)
    stream = await connected(h)
    script = f"head -c {size} /dev/zero | tr '\\000' x; echo; echo end"
    stream.grant(exec_lease(["/bin/sh", "-c", script], "wf/flood/1"))
    (result,) = await h.coord.wait_for(lambda: stream.results, 30)
    assert result.outcome == pb.ACTION_OUTCOME_SUCCEEDED
    seconds = result.duration.ToTimedelta().total_seconds()
    messages = [m for m in stream.received if m.HasField("action_logs")]
    sent = _logs(stream.received)
    # At most one message per interval while it ran, and one with the rest before the result.
    assert len(messages) <= seconds / LOG_INTERVAL + 2, (len(messages), seconds)
    assert all(len(data) <= LOG_CHUNK_BYTES for _, data in sent)
    assert sum(len(data) for _, data in sent) <= len(messages) * LOG_CHUNK_BYTES
    if sent:  # the stream was followed: its end came through, after a gap
        offset, data = sent[-1]
        assert offset + len(data) == size + len("\nend\n") and data.endswith(b"end\n")
    assert result.stdout_tail.endswith("x\nend\n")


async def test_a_handlers_log_lines_are_sent_while_it_runs(h: Harness) -> None:
    release = asyncio.Event()
    worker = Worker()

    @worker.action("talk")
    async def talk(ctx: ActionContext) -> dict[str, Any]:
        ctx.log("hello")
        await release.wait()
        ctx.log("bye")
        return {}

    gate = threading.Event()

    @worker.action("talk_sync")
    def talk_sync(ctx: ActionContext) -> dict[str, Any]:  # in a pool thread
        ctx.log("from a thread")
        gate.wait(30)
        ctx.log("done")
        return {}

    h.keeper.start()
    h.executors = [worker.executor(2)]
    config = SessionConfig(
        worker_id="w1",
        coordinator=f"127.0.0.1:{h.port}",
        slots=2,
        reconnect_initial=timedelta(milliseconds=50),
        reconnect_max=timedelta(seconds=1),
    )
    h.session = WorkerSession(config, h.executors)
    h.task = asyncio.create_task(h.session.run())
    stream = await connected(h)
    stream.grant(handler_lease("talk", "wf/talk/1"))
    await h.coord.wait_for(lambda: _logs(stream.received))
    assert _logs(stream.received) == [(0, b"hello\n")] and not stream.results
    release.set()
    (result,) = await h.coord.wait_for(lambda: stream.results)
    assert _logs(stream.received) == [(0, b"hello\n"), (6, b"bye\n")]
    assert result.stdout_tail == "hello\nbye"
    stream.grant(handler_lease("talk_sync", "wf/sync/1"))

    def sync_logs() -> list[bytes]:
        return [
            c.data
            for m in stream.received
            if m.HasField("action_logs")
            for e in m.action_logs.leases
            if e.lease_id == "wf/sync/1"
            for c in e.chunks
        ]

    await h.coord.wait_for(sync_logs)
    assert sync_logs() == [b"from a thread\n"]
    gate.set()
    await h.coord.wait_for(lambda: len(stream.results) == 2)
    assert sync_logs() == [b"from a thread\n", b"done\n"]
