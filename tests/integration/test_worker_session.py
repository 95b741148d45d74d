"""WorkerSession against a small in-test coordinator: real grpc.aio server, real bidi streams.

The fake coordinator plays the coordinator's side of worker_service.proto: Welcome, grants,
acks (or withholds them), cancellations and drain. Exec attempts are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import worker_service_pb2_grpc as pb_grpc
from plait.v1 import workflow_pb2
from plait.worker import ActionContext, SessionConfig, Worker, WorkerSession
from plait.worker.adaptive import AdaptiveConfig, LoadReading
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.keeper import Keeper

HEARTBEAT, TTL, GRACE = 0.1, 1.5, 0.2
OK, FAILED_PRECONDITION = 0, 9


class FakeStream:
    """One worker stream, as the coordinator sees it."""

    def __init__(self, coord: FakeCoordinator) -> None:
        self.coord = coord
        self.outbox: asyncio.Queue[pb.ConnectResponse | None] = asyncio.Queue()
        self.received: list[pb.ConnectRequest] = []
        self.hello: pb.Hello | None = None
        self.heartbeat_recv: dict[int, float] = {}
        self.acked_heartbeats: list[tuple[int, float]] = []
        self.goodbye = False
        self.ended = False
        self.grant_seq = 0

    def send(self, **kw: Any) -> None:
        msg = pb.ConnectResponse(**kw)
        self.coord.hlc.stamp(msg.hlc)
        self.outbox.put_nowait(msg)

    def grant(self, *leases: pb.Lease) -> None:
        self.grant_seq += 1
        self.send(lease_grant=pb.LeaseGrant(sequence=self.grant_seq, leases=leases))

    def end(self) -> None:
        """The coordinator closes the stream (status OK)."""
        self.outbox.put_nowait(None)

    def of(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.received if m.WhichOneof("message") == kind]

    @property
    def results(self) -> list[pb.ActionResult]:
        return [r for f in self.of("action_finished") for r in f.results]

    @property
    def credit(self) -> int:
        """Slots handed back, in Credit messages or riding on ActionFinished."""
        return sum(c.slots for c in self.of("credit")) + sum(
            f.credit for f in self.of("action_finished")
        )


class FakeCoordinator(pb_grpc.WorkerServiceServicer):
    """The coordinator's side of the protocol, with knobs for the tests."""

    def __init__(self) -> None:
        self.hlc = HybridLogicalClock(SystemClock())
        self.streams: list[FakeStream] = []
        self.changed = asyncio.Event()
        self.ack_heartbeats = True
        self.ack_results = True
        self.result_status = OK
        self.kill_on_hello: set[str] = set()

    @property
    def stream(self) -> FakeStream:
        return self.streams[-1]

    async def wait_for(self, pred: Callable[[], Any], limit: float = 10.0) -> Any:
        end = time.monotonic() + limit
        while True:
            value = pred()
            if value:
                return value
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise AssertionError("condition not met in time")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Any
    ) -> AsyncIterator[pb.ConnectResponse]:
        stream = FakeStream(self)
        self.streams.append(stream)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                msg = await stream.outbox.get()
                if msg is None:
                    break
                yield msg
        finally:
            stream.ended = True
            reader.cancel()
            self.changed.set()

    async def _read(self, stream: FakeStream, requests: AsyncIterator[pb.ConnectRequest]) -> None:
        try:
            async for req in requests:
                assert req.hlc.physical_ms > 0, "every message carries the worker's HLC"
                stream.received.append(req)
                self._handle(stream, req)
                self.changed.set()
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        stream.end()

    def _handle(self, stream: FakeStream, req: pb.ConnectRequest) -> None:
        kind = req.WhichOneof("message")
        if kind == "hello":
            stream.hello = req.hello
            welcome = pb.Welcome(session_id=f"s{len(self.streams)}")
            welcome.heartbeat_interval.FromTimedelta(timedelta(seconds=HEARTBEAT))
            welcome.lease_ttl.FromTimedelta(timedelta(seconds=TTL))
            welcome.kill_grace.FromTimedelta(timedelta(seconds=GRACE))
            for rep in req.hello.running:
                (welcome.kill if rep.lease_id in self.kill_on_hello else welcome.adopted).append(
                    rep
                )
            stream.send(welcome=welcome)
        elif kind == "heartbeat":
            seq = req.heartbeat.sequence
            stream.heartbeat_recv[seq] = time.monotonic()
            if self.ack_heartbeats:
                stream.acked_heartbeats.append((seq, time.monotonic()))
                stream.send(ack=pb.Ack(heartbeat_sequence=seq))
        elif kind == "action_finished" and self.ack_results:
            acks = [
                pb.ResultAck(lease_id=r.lease_id, fencing_token=r.fencing_token)
                for r in req.action_finished.results
            ]
            for a in acks:
                a.status.code = self.result_status
                a.status.message = "lease token 1 superseded by 2" if self.result_status else ""
            stream.send(ack=pb.Ack(results=acks))
        elif kind == "goodbye":
            stream.goodbye = True


def handler_lease(name: str, lease_id: str, token: int = 1, slots: int = 0) -> pb.Lease:
    spec = workflow_pb2.ActionSpec(id=lease_id, handler=name, slots=slots)
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf",
        action_id=lease_id,
        attempt=1,
        fencing_token=token,
        action=spec,
        inputs_json=json.dumps({"input": {"n": 1}, "needs": {}}),
    )


def exec_lease(argv: list[str], lease_id: str, token: int = 1) -> pb.Lease:
    spec = workflow_pb2.ActionSpec(id=lease_id, exec=workflow_pb2.ExecAction(argv=argv))
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf",
        action_id=lease_id,
        attempt=1,
        fencing_token=token,
        action=spec,
    )


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def wait_pid_file(path: Path, limit: float = 10.0) -> int:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never written")


async def wait_dead(pid: int, limit: float = 10.0) -> float:
    """Waits for the process to die; returns the monotonic time it was first seen dead."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if not alive(pid):
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise AssertionError(f"pid {pid} still alive")


# ---------------------------------------------------------------- fixtures

gate = asyncio.Event


def make_worker(release: asyncio.Event) -> Worker:
    w = Worker()

    @w.action("noop")
    async def noop(ctx: ActionContext) -> dict[str, Any]:
        return {"n": ctx.input["n"]}

    @w.action("sync")
    def sync(ctx: ActionContext) -> dict[str, Any]:
        return {"sync": True}

    @w.action("blocked")
    async def blocked(ctx: ActionContext) -> dict[str, Any]:
        await release.wait()
        return {"released": True}

    @w.action("progress")
    async def progress(ctx: ActionContext) -> dict[str, Any]:
        for pct in range(5, 101, 5):
            ctx.heartbeat({"pct": pct})
            await asyncio.sleep(0.01)
        await release.wait()
        return {"item": ctx.item}

    @w.action("progress_sync")
    def progress_sync(ctx: ActionContext) -> dict[str, Any]:
        ctx.heartbeat({"pct": 50, "sync": True})
        try:
            ctx.heartbeat({"blob": "x" * (64 * 1024)})
        except ValueError as err:
            return {"refused": str(err)}
        return {}

    return w


class FakeProbe:
    """Load readings chosen by the test."""

    def __init__(self) -> None:
        self.reading = LoadReading(load_per_cpu=0.2, mem_available=0.6)

    def read(self) -> LoadReading:
        return self.reading


HEALTHY = LoadReading(load_per_cpu=0.2, mem_available=0.6)
OVERLOADED = LoadReading(load_per_cpu=3.0, mem_available=0.6)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.coord = FakeCoordinator()
        self.server: Any = None
        self.port = 0
        self.release = asyncio.Event()
        self.session: WorkerSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.executors: list[Any] = []
        self.keeper = Keeper()

    async def start_server(self, port: int = 0) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_WorkerServiceServicer_to_server(self.coord, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()

    def start_session(
        self, slots: int = 4, load_probe: FakeProbe | None = None, **kw: Any
    ) -> WorkerSession:
        self.keeper.start()
        self.executors = [
            make_worker(self.release).executor(slots),
            ExecExecutor(keeper=self.keeper, tmp_root=str(self.tmp)),
        ]
        config = SessionConfig(
            worker_id="w1",
            coordinator=f"127.0.0.1:{self.port}",
            slots=slots,
            labels={"zone": "test"},
            reconnect_initial=timedelta(milliseconds=50),
            reconnect_max=timedelta(seconds=1),
            **kw,
        )
        self.session = WorkerSession(config, self.executors, load_probe=load_probe)
        self.task = asyncio.create_task(self.session.run())
        return self.session

    async def close(self) -> None:
        self.release.set()
        if self.session is not None and self.task is not None:
            self.session.stop("test over")
            await asyncio.wait_for(self.task, 15)
        for ex in self.executors:
            await ex.aclose()
        self.keeper.close()
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.start_server()
    try:
        yield harness
    finally:
        await harness.close()


async def connected(h: Harness) -> FakeStream:
    await h.coord.wait_for(lambda: h.coord.streams and h.coord.stream.of("heartbeat"))
    return h.coord.stream


# ---------------------------------------------------------------- tests


async def test_hello_welcome_and_heartbeats(h: Harness) -> None:
    session = h.start_session(slots=3)
    stream = await connected(h)
    hello = stream.hello
    assert hello is not None
    assert stream.received[0].WhichOneof("message") == "hello"
    assert (hello.worker_id, hello.slots, dict(hello.labels)) == ("w1", 3, {"zone": "test"})
    assert list(hello.handlers) == ["blocked", "noop", "progress", "progress_sync", "sync"]
    assert hello.exec_enabled and hello.agent.startswith("plait-python/") and hello.hostname
    assert list(hello.running) == []
    await h.coord.wait_for(lambda: len(stream.of("heartbeat")) >= 4)
    seqs = [hb.sequence for hb in stream.of("heartbeat")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert stream.of("heartbeat")[-1].free_slots == 3
    assert session.heartbeat_interval == HEARTBEAT and session.lease_ttl == TTL
    assert session.kill_grace == GRACE and session.session_id == "s1"
    # The fence deadline follows the acked heartbeats.
    assert session.fence_deadline > time.monotonic() + TTL - 3 * HEARTBEAT


async def test_hello_advertises_resources(h: Harness) -> None:
    h.start_session(slots=2, resources={"cpu": 2.5, "memory_mb": 4096, "gpu": 1})
    stream = await connected(h)
    assert stream.hello is not None
    assert dict(stream.hello.resources) == {"cpu": 2.5, "memory_mb": 4096, "gpu": 1}


async def test_grants_run_results_acked_and_credit_returned(h: Harness) -> None:
    session = h.start_session(slots=4)
    stream = await connected(h)
    stream.grant(handler_lease("noop", "l1"), handler_lease("sync", "l2"))
    await h.coord.wait_for(lambda: len(stream.results) == 2)
    by_id = {r.lease_id: r for r in stream.results}
    assert json.loads(by_id["l1"].outputs_json) == {"n": 1}
    assert json.loads(by_id["l2"].outputs_json) == {"sync": True}
    assert all(r.outcome == pb.ACTION_OUTCOME_SUCCEEDED for r in stream.results)
    assert all(r.finished_hlc.physical_ms > 0 and r.HasField("duration") for r in stream.results)
    started = {rep.lease_id for s in stream.of("action_started") for rep in s.leases}
    # A start report is skipped only when the result leaves in the same flush (it implies it).
    assert started <= {"l1", "l2"}
    await h.coord.wait_for(lambda: stream.credit == 2)
    await h.coord.wait_for(lambda: not session.unacked)
    # Later heartbeats carry the grant sequence and no longer list the acked leases.
    await h.coord.wait_for(
        lambda: (
            stream.of("heartbeat")[-1].last_grant_sequence == 1
            and not stream.of("heartbeat")[-1].leases
        )
    )


async def test_results_and_starts_are_batched(h: Harness) -> None:
    h.start_session(slots=64)
    stream = await connected(h)
    stream.grant(*(handler_lease("noop", f"l{i}") for i in range(64)))
    await h.coord.wait_for(lambda: len(stream.results) == 64)
    await h.coord.wait_for(lambda: stream.credit == 64)
    assert len(stream.of("action_finished")) <= 4
    assert len(stream.of("action_started")) <= 4
    assert stream.of("credit") == []  # the credit rode with the results


async def test_unacked_results_are_kept_listed_and_resent_after_reconnect(h: Harness) -> None:
    session = h.start_session()
    h.coord.ack_results = False
    first = await connected(h)
    first.grant(handler_lease("noop", "l1", token=7))
    await h.coord.wait_for(lambda: first.results)
    # Still held: every heartbeat lists it.
    await h.coord.wait_for(
        lambda: any(
            (r.lease_id, r.fencing_token) == ("l1", 7) for r in first.of("heartbeat")[-1].leases
        )
    )
    assert session.unacked == [("l1", 7)]
    h.coord.ack_results = True
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.results)
    second = h.coord.stream
    # The finished attempt's lease is still held (0 slots) until its re-sent result is acked.
    assert second.hello is not None
    assert [(r.lease_id, r.fencing_token, r.slots) for r in second.hello.running] == [("l1", 7, 0)]
    assert [(r.lease_id, r.fencing_token) for r in second.results] == [("l1", 7)]
    assert second.credit == 0  # Hello already accounted for the freed slot
    await h.coord.wait_for(lambda: not session.unacked)


async def test_refused_results_are_forgotten(h: Harness) -> None:
    session = h.start_session()
    h.coord.result_status = FAILED_PRECONDITION
    stream = await connected(h)
    stream.grant(handler_lease("noop", "l1"))
    await h.coord.wait_for(lambda: stream.results)
    await h.coord.wait_for(lambda: not session.unacked)
    assert session.stats.results_refused == 1


async def test_self_fencing_kills_exec_before_send_time_plus_ttl(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1"))
    pid = await wait_pid_file(pidfile)
    await h.coord.wait_for(lambda: len(stream.acked_heartbeats) >= 2)
    h.coord.ack_heartbeats = False
    await asyncio.sleep(0)  # the flag applies from the next heartbeat on
    _, last_acked_recv = stream.acked_heartbeats[-1]
    died = await wait_dead(pid, limit=TTL + 2)
    # The heartbeat was sent before it was received, so send_time + TTL <= recv + TTL.
    assert died < last_acked_recv + TTL
    assert died > last_acked_recv + TTL - GRACE - 2 * HEARTBEAT - 0.5  # not killed early
    assert session.stats.self_fenced == 1
    # Acks resume; the CANCELLED result reaches the coordinator (same stream or the next).
    h.coord.ack_heartbeats = True
    result = await h.coord.wait_for(
        lambda: next((r for s in h.coord.streams for r in s.results if r.lease_id == "x1"), None)
    )
    assert result.outcome == pb.ACTION_OUTCOME_CANCELLED
    assert "self-fenced" in result.error.message


async def test_self_fencing_while_the_coordinator_is_down(h: Harness) -> None:
    h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1"))
    pid = await wait_pid_file(pidfile)
    await h.coord.wait_for(lambda: len(stream.acked_heartbeats) >= 2)
    port = h.port
    await h.server.stop(0)
    last_ack_recv = stream.acked_heartbeats[-1][1]
    died = await wait_dead(pid, limit=TTL + 2)
    assert died < last_ack_recv + TTL
    # The coordinator comes back on the same port: the result is re-sent and acked.
    await h.start_server(port)
    result = await h.coord.wait_for(
        lambda: next((r for s in h.coord.streams[1:] for r in s.results), None), limit=15
    )
    assert result.lease_id == "x1" and result.outcome == pb.ACTION_OUTCOME_CANCELLED


async def test_cancel_lease_terms_the_exec_action(h: Harness) -> None:
    h.start_session()
    stream = await connected(h)
    pidfile = h.tmp / "pid"
    stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1", 5))
    pid = await wait_pid_file(pidfile)
    stream.send(
        cancel_lease=pb.CancelLease(
            leases=[
                pb.LeaseCancellation(
                    lease_id="x1", fencing_token=5, reason=pb.CANCEL_REASON_USER, message="bye"
                )
            ]
        )
    )
    await wait_dead(pid, limit=5)
    await h.coord.wait_for(lambda: stream.results)
    r = stream.results[0]
    assert r.outcome == pb.ACTION_OUTCOME_CANCELLED and r.exit_code == -signal.SIGTERM
    assert "CANCEL_REASON_USER" in r.error.message
    await h.coord.wait_for(lambda: stream.credit == 1)


async def test_drain_finishes_work_then_says_goodbye(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    stream.grant(handler_lease("blocked", "b1"))
    await h.coord.wait_for(lambda: stream.of("action_started"))
    stream.send(drain=pb.Drain(reason="maintenance"))
    await h.coord.wait_for(lambda: session.draining)
    await asyncio.sleep(0.2)
    assert not stream.goodbye and not h.task.done()  # type: ignore[union-attr]
    h.release.set()
    await h.coord.wait_for(lambda: stream.goodbye)
    await asyncio.wait_for(h.task, 10)  # type: ignore[arg-type]
    assert [r.lease_id for r in stream.results] == ["b1"]
    assert stream.credit == 0  # no new work invited while draining
    assert stream.of("goodbye")[0].reason == "drained"
    assert stream.received[-1].WhichOneof("message") == "goodbye"


async def test_over_grant_is_reported_failed(h: Harness) -> None:
    session = h.start_session(slots=2)
    stream = await connected(h)
    stream.grant(*(handler_lease("blocked", f"b{i}") for i in range(3)))
    await h.coord.wait_for(lambda: stream.results)
    (r,) = stream.results
    assert r.lease_id == "b2" and r.outcome == pb.ACTION_OUTCOME_FAILED
    assert "over-grant" in r.error.message
    assert session.stats.over_grants == 1 and len(session.running) == 2
    await asyncio.sleep(0.1)
    assert stream.credit == 0  # the refused lease never held a slot
    h.release.set()
    await h.coord.wait_for(lambda: len(stream.results) == 3 and stream.credit == 2)


async def test_multi_slot_leases_and_unknown_handlers(h: Harness) -> None:
    h.start_session(slots=4)
    stream = await connected(h)
    stream.grant(handler_lease("blocked", "big", slots=3), handler_lease("nope", "u1"))
    r = await h.coord.wait_for(
        lambda: next((r for r in stream.results if r.lease_id == "u1"), None)
    )
    assert (
        r.outcome == pb.ACTION_OUTCOME_FAILED and "does not serve handler 'nope'" in r.error.message
    )
    await h.coord.wait_for(lambda: stream.credit == 1)
    await h.coord.wait_for(lambda: stream.of("heartbeat")[-1].free_slots == 1)
    h.release.set()
    await h.coord.wait_for(lambda: stream.credit == 4)


async def test_reconnect_reports_running_and_kills_what_is_not_adopted(h: Harness) -> None:
    session = h.start_session(slots=4)
    first = await connected(h)
    pidfile = h.tmp / "pid"
    first.grant(
        exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1", 3),
        handler_lease("blocked", "b1", 4),
    )
    pid = await wait_pid_file(pidfile)
    h.coord.kill_on_hello = {"x1"}
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.hello)
    second = h.coord.stream
    assert second.hello is not None
    assert {(r.lease_id, r.fencing_token) for r in second.hello.running} == {("x1", 3), ("b1", 4)}
    await wait_dead(pid, limit=5)
    r = await h.coord.wait_for(lambda: next(iter(second.results), None))
    assert r.lease_id == "x1" and r.outcome == pb.ACTION_OUTCOME_CANCELLED
    # Credits after the Hello count only slots freed since: x1's, then b1's.
    await h.coord.wait_for(lambda: second.credit == 1)
    assert session.running == ["b1"]
    h.release.set()
    await h.coord.wait_for(lambda: second.credit == 2)


async def test_coordinator_clock_far_ahead_is_counted_not_fatal(h: Harness) -> None:
    session = h.start_session()
    stream = await connected(h)
    msg = pb.ConnectResponse(ack=pb.Ack())
    msg.hlc.physical_ms = int(time.time() * 1000) + 3_600_000
    stream.outbox.put_nowait(msg)
    await h.coord.wait_for(lambda: session.stats.clock_offset_errors >= 1)
    stream.grant(handler_lease("noop", "l1"))
    await h.coord.wait_for(lambda: stream.results)
    assert session.connected


async def test_reconnects_until_the_coordinator_appears(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    # Reserve a port, then start the worker before the server exists.
    await harness.start_server()
    port = harness.port
    await harness.server.stop(0)
    try:
        session = harness.start_session()
        await asyncio.sleep(0.5)
        assert not session.connected
        await harness.start_server(port)
        await connected(harness)
        assert session.connected
    finally:
        await harness.close()


# ---------------------------------------------------------------- workerd end to end

HANDLERS = """
import plait
worker = plait.Worker()

@worker.action("hello")
async def hello(ctx):
    return {"hello": ctx.input["n"], "worker_token": ctx.fencing_token}
"""


async def test_workerd_serves_exec_and_handlers_and_drains_on_sigterm(h: Harness) -> None:
    handlers = h.tmp / "handlers.py"
    handlers.write_text(HANDLERS)
    env = dict(os.environ, PLAIT_CLOCK_OFFSET="-1h", PLAIT_WORKER_ID="wd-1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plait.workerd",
            "--coordinator",
            f"127.0.0.1:{h.port}",
            "--slots",
            "2",
            "--label",
            "role=test",
            "--handlers",
            str(handlers),
            "--reconnect-backoff",
            "50ms:1s",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stream = await h.coord.wait_for(
            lambda: h.coord.streams and h.coord.stream.hello and h.coord.stream, limit=30
        )
        hello = stream.hello
        assert hello.worker_id == "wd-1" and hello.agent.startswith("plait-workerd/")
        assert list(hello.handlers) == ["hello"] and hello.exec_enabled
        assert dict(hello.labels) == {"role": "test"} and hello.slots == 2
        # The skewed wall clock shows in the worker's HLC stamps, an hour behind ours.
        assert stream.received[0].hlc.physical_ms < time.time() * 1000 - 3_000_000
        stream.grant(
            handler_lease("hello", "h1", token=11),
            exec_lease(["/bin/sh", "-c", 'printf \'{"v": 1}\' > "$PLAIT_OUTPUT"'], "e1"),
        )
        await h.coord.wait_for(lambda: len(stream.results) == 2, limit=20)
        by_id = {r.lease_id: r for r in stream.results}
        assert json.loads(by_id["h1"].outputs_json) == {"hello": 1, "worker_token": 11}
        assert json.loads(by_id["e1"].outputs_json) == {"v": 1}
        await h.coord.wait_for(lambda: len(stream.of("heartbeat")) >= 2)
        proc.send_signal(signal.SIGTERM)
        await h.coord.wait_for(lambda: stream.goodbye, limit=20)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        assert out == b""
        assert b"draining" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- adaptive concurrency


async def test_adaptive_concurrency_withholds_then_releases_credit(h: Harness) -> None:
    probe = FakeProbe()
    # The interval is an hour: the test drives every reading through session.adapt().
    session = h.start_session(
        slots=4, load_probe=probe, adaptive=AdaptiveConfig(interval=timedelta(hours=1))
    )
    stream = await connected(h)
    assert session.stats.offered_slots == 4 and session.adapt().limit == 4  # healthy, at slots
    stream.grant(*(handler_lease("blocked", f"b{i}") for i in range(4)))
    await h.coord.wait_for(lambda: len(session.running) == 4)

    probe.reading = OVERLOADED
    assert [session.adapt().limit for _ in range(3)] == [2, 1, 1]  # halves, never below 1
    assert session.stats.offered_slots == 1 and session.stats.adaptive_decreases == 2

    # All four finish: only one slot goes back; three are withheld (running < limit again).
    h.release.set()
    await h.coord.wait_for(lambda: len(stream.results) == 4 and stream.credit == 1)
    await asyncio.sleep(0.2)
    assert stream.credit == 1
    assert session.withheld_slots == 3 and session.stats.withheld_slots == 3

    # Recovery: +1 per reading, each step credited at once, never above the slots.
    probe.reading = HEALTHY
    for expected in (2, 3, 4):
        adj = session.adapt()
        assert (adj.limit, adj.release) == (expected, 1)
        await h.coord.wait_for(lambda expected=expected: stream.credit == expected)
    adj = session.adapt()
    assert (adj.limit, adj.release) == (4, 0)
    await asyncio.sleep(0.2)
    assert stream.credit == 4 and session.withheld_slots == 0
    assert sum(c.slots for c in stream.of("credit")) == 3  # the releases were plain Credits


async def test_adaptive_limit_survives_a_reconnect(h: Harness) -> None:
    probe = FakeProbe()
    session = h.start_session(
        slots=4, load_probe=probe, adaptive=AdaptiveConfig(interval=timedelta(hours=1))
    )
    first = await connected(h)
    probe.reading = OVERLOADED
    assert session.adapt().limit == 2
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.of("heartbeat"))
    second = h.coord.stream
    # Hello restarts the coordinator's ledger from every slot; the limit is re-imposed by
    # withholding the first freed slots.
    assert second.hello is not None and second.hello.slots == 4
    second.grant(*(handler_lease("noop", f"n{i}") for i in range(4)))
    await h.coord.wait_for(lambda: len(second.results) == 4 and second.credit == 2)
    await asyncio.sleep(0.2)
    assert second.credit == 2 and session.withheld_slots == 2


# ---------------------------------------------------------------- progress heartbeats


async def test_progress_heartbeats_are_batched_onto_the_stream(h: Harness) -> None:
    session = h.start_session(progress_interval=timedelta(milliseconds=150))
    stream = await connected(h)
    child = handler_lease("progress", "p1", token=3)
    child.inputs_json = json.dumps({"input": None, "item": {"name": "a"}, "needs": {}})
    stream.grant(child, handler_lease("progress_sync", "p2", token=4))

    def progress() -> list[pb.LeaseProgress]:
        return [p for m in stream.of("action_progress") for p in m.leases]

    # The handler reports 20 times over ~0.2 s+; the coordinator sees the latest at the end.
    await h.coord.wait_for(
        lambda: any(
            p.lease_id == "p1" and json.loads(p.details_json) == {"pct": 100} for p in progress()
        )
    )
    messages = stream.of("action_progress")
    assert len(messages) <= 5  # throttled: at most one ActionProgress per 150 ms
    for m in messages:
        assert len({p.lease_id for p in m.leases}) == len(m.leases)  # latest per lease only
    p1 = [p for p in progress() if p.lease_id == "p1"]
    assert all(p.fencing_token == 3 for p in p1) and len(p1) < 20
    pcts = [json.loads(p.details_json)["pct"] for p in p1]
    assert pcts == sorted(pcts)

    # The sync handler's heartbeat (from a pool thread) arrived; its oversized one was refused.
    (p2,) = [p for p in progress() if p.lease_id == "p2"]
    assert p2.fencing_token == 4 and json.loads(p2.details_json) == {"pct": 50, "sync": True}
    r2 = await h.coord.wait_for(lambda: next((r for r in stream.results if r.lease_id == "p2"), 0))
    assert "over the 64 KiB (65536-byte) limit" in json.loads(r2.outputs_json)["refused"]

    h.release.set()
    r1 = await h.coord.wait_for(lambda: next((r for r in stream.results if r.lease_id == "p1"), 0))
    assert json.loads(r1.outputs_json) == {"item": {"name": "a"}}  # ctx.item
    assert session.stats.progress_sent == len(progress())
