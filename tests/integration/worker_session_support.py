"""Test support (integration tier) for the WorkerSession tests: a small in-test coordinator
on a real grpc.aio server with real bidi streams, and the harness around a session.

The fake coordinator plays the coordinator's side of worker_service.proto: Welcome, grants,
acks (or withholds them), cancellations and drain. Exec attempts are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import worker_service_pb2_grpc as pb_grpc
from plait.v1 import workflow_pb2
from plait.worker import ActionContext, SessionConfig, Worker, WorkerSession
from plait.worker.adaptive import LoadReading
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
        self.metadata: dict[str, str] = {}
        self.aborted: tuple[grpc.StatusCode, str] | None = None

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

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """The coordinator ends the stream with an error status (e.g. ABORTED: replaced)."""
        self.aborted = (code, details)
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
        self.refuse_connects = 0
        """Refuse this many Connect calls with ALREADY_EXISTS (a live session holds the id)."""
        self.refused_connects = 0
        self.early_metadata = True
        """Send initial metadata on accepting a stream (False: like an older coordinator)."""

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
        if self.refused_connects < self.refuse_connects:
            self.refused_connects += 1
            self.changed.set()
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, "worker w1 is connected (session s1)"
            )
        if self.early_metadata:  # as the real coordinator does once it accepts a stream
            await context.send_initial_metadata(())
        stream = FakeStream(self)
        stream.metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.streams.append(stream)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                msg = await stream.outbox.get()
                if msg is None:
                    break
                yield msg
            if stream.aborted is not None:
                await context.abort(*stream.aborted)
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
            # A distinct resume token per stream, so a test can tell which one came back.
            welcome = pb.Welcome(
                session_id=f"s{len(self.streams)}", resume_token=f"resume-{len(self.streams)}"
            )
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


async def connected(h: Harness) -> FakeStream:
    await h.coord.wait_for(lambda: h.coord.streams and h.coord.stream.of("heartbeat"))
    return h.coord.stream


async def next_heartbeat(h: Harness, session: WorkerSession) -> None:
    """Waits until a heartbeat the session sends from now on reaches the coordinator.

    Everything a session sends shares one ordered stream, so that heartbeat's arrival proves
    whatever the session had queued before this call (a Goodbye, a Credit) has arrived too: a
    test that then finds no such message knows none was sent, without sleeping.
    """
    after = session.stats.heartbeats_sent  # sequences count on across streams
    await h.coord.wait_for(
        lambda: any(hb.sequence > after for s in h.coord.streams for hb in s.of("heartbeat"))
    )
