"""What idle workers cost the coordinator: ``python -m tests.bench.idle_workers``.

Starts a real coordinator process (the system tests' harness) and connects 1,000 protocol-level
workers to it from this process: each a ``WorkerService.Connect`` stream on its own channel and
TCP connection, as real workers have, that says ``hello``, heartbeats at once when welcomed and
then at the ``Welcome``'s cadence (their phases spread over the interval, as workers that
connected at different times are), echoing the newest ``Ack.heartbeat_sequence`` it received.
Nothing is submitted: the workers hold no leases.

For each heartbeat interval (5 s, the default, and 1 s) it measures the coordinator process's
CPU (``utime + stime`` from ``/proc/PID/stat``) over a window (30 s by default), after one
interval of settling, and prints the share of one core and the CPU per heartbeat (gross, and
net of the same coordinator idle with no worker, measured first). It checks that every
heartbeat of the window was acked and that every worker is still connected. Not a test (the
goal, < 5 % of a core at the default cadence, stays here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import admin_service_pb2_grpc as admin_grpc
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc
from tests.system.harness import Cluster

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


@dataclass
class IdleWorker:
    """One protocol-level worker that only heartbeats."""

    worker_id: str
    channel: grpc.aio.Channel
    hlc: HybridLogicalClock
    outbox: asyncio.Queue[wpb.ConnectRequest | None] = field(default_factory=asyncio.Queue)
    welcome: asyncio.Event = field(default_factory=asyncio.Event)
    interval: float = 0.0
    sent = 0  # heartbeats sent
    heard = 0  # newest Ack.heartbeat_sequence received
    acked = 0  # heartbeat acks received
    ended: str = ""  # why the stream ended, if it did

    def send(self, msg: wpb.ConnectRequest) -> None:
        self.hlc.stamp(msg.hlc)
        self.outbox.put_nowait(msg)

    def beat(self) -> None:
        self.sent += 1
        msg = wpb.ConnectRequest()
        hb = msg.heartbeat
        hb.sequence = self.sent
        hb.last_ack_sequence = self.heard
        self.send(msg)

    async def requests(self) -> AsyncIterator[wpb.ConnectRequest]:
        while True:
            msg = await self.outbox.get()
            if msg is None:
                return
            yield msg

    async def run(self) -> None:
        """Connects, then reads the stream until it ends."""
        stub = wgrpc.WorkerServiceStub(self.channel)
        hello = wpb.ConnectRequest()
        hello.hello.worker_id = self.worker_id
        hello.hello.slots = 1
        hello.hello.handlers.append("idle")
        self.send(hello)
        call = stub.Connect(self.requests())
        try:
            async for msg in call:
                kind = msg.WhichOneof("message")
                if kind == "ack":
                    if msg.ack.heartbeat_sequence:
                        self.acked += 1
                        self.heard = max(self.heard, msg.ack.heartbeat_sequence)
                elif kind == "welcome":
                    self.interval = msg.welcome.heartbeat_interval.ToTimedelta().total_seconds()
                    self.beat()  # as every worker does once welcomed
                    self.welcome.set()
        except grpc.aio.AioRpcError as e:
            self.ended = f"{e.code().name}: {e.details()}"
        else:
            self.ended = "stream ended"
        finally:
            self.welcome.set()

    async def beats(self, phase: float) -> None:
        """Heartbeats at the Welcome's cadence, starting ``phase`` of an interval late."""
        await asyncio.sleep(phase * self.interval)
        next_at = time.monotonic()
        while not self.ended:
            self.beat()
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True)
class Measured:
    interval: float
    workers: int
    window: float
    cpu: float
    heartbeats: int
    base_share: float  # share of a core the coordinator used with no worker

    @property
    def share(self) -> float:
        return self.cpu / self.window

    def line(self) -> str:
        per = self.cpu / max(1, self.heartbeats) * 1e6
        net = max(0.0, self.share - self.base_share) * self.window / max(1, self.heartbeats) * 1e6
        return (
            f"heartbeat {self.interval:g}s, {self.workers} workers: {self.share * 100:.2f} % of a"
            f" core over {self.window:.1f}s ({self.heartbeats:,} heartbeats, {per:.0f} us each;"
            f" net of the idle coordinator's {self.base_share * 100:.2f} %: {net:.0f} us each)"
        )


async def measure(
    target: str, pid: int, workers: int, window: float, base_share: float
) -> Measured:
    clock = SystemClock()
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per worker
    fleet = [
        IdleWorker(
            f"idle-{i:04d}",
            grpc.aio.insecure_channel(target, options=options),
            HybridLogicalClock(clock),
        )
        for i in range(workers)
    ]
    readers = []
    for i in range(0, workers, 50):  # connect in waves: 1,000 hellos at once would time out
        batch = fleet[i : i + 50]
        readers += [asyncio.create_task(w.run()) for w in batch]
        await asyncio.wait_for(asyncio.gather(*(w.welcome.wait() for w in batch)), 60)
    failed = [w for w in fleet if w.ended]
    if failed:
        raise SystemExit(f"{len(failed)} workers not welcomed: {failed[0].ended}")
    interval = fleet[0].interval
    rng = random.Random(1)
    beaters = [asyncio.create_task(w.beats(rng.random())) for w in fleet]
    try:
        await asyncio.sleep(interval + 1.0)  # every worker has heartbeat on its own phase
        sent0 = sum(w.sent for w in fleet)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(window)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        sent1 = sum(w.sent for w in fleet)
        await asyncio.sleep(min(2.0, interval))  # the window's last acks arrive
        ended = [w for w in fleet if w.ended]
        if ended:
            raise SystemExit(f"{len(ended)} streams ended: {ended[0].ended}")
        missing = sum(w.sent - w.acked for w in fleet if w.sent - w.acked > 1)
        if missing:
            raise SystemExit(f"{missing} heartbeats were never acked")
        async with grpc.aio.insecure_channel(target) as channel:
            admin = admin_grpc.AdminServiceStub(channel)
            listed = (await admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=30)).workers
        if len(listed) != workers:
            raise SystemExit(f"{len(listed)} workers connected, not {workers}")
        return Measured(interval, workers, t1 - t0, cpu1 - cpu0, sent1 - sent0, base_share)
    finally:
        for task in beaters:
            task.cancel()
        for w in fleet:
            w.outbox.put_nowait(None)
        await asyncio.wait(readers, timeout=10)
        for w in fleet:
            await w.channel.close()


def idle_share(pid: int, window: float) -> float:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)  # measuring the coordinator over a span of time is the point here
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


def run(interval: str, workers: int, window: float) -> Measured:
    tmp = Path(tempfile.mkdtemp(prefix="plait-idle-"))
    cluster = Cluster(tmp)
    try:
        seconds = float(interval.removesuffix("s"))
        ttl = max(30.0, 5 * seconds)  # the coordinator's rule: lease_ttl >= 5 x heartbeat
        endpoints = cluster.start_coordinator(
            heartbeat_interval=interval, lease_ttl=f"{ttl:g}s", kill_grace="10s"
        )
        base = idle_share(endpoints.pid, min(window, 10.0))
        return asyncio.run(measure(endpoints.grpc, endpoints.pid, workers, window, base))
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU measured")
    parser.add_argument(
        "--intervals", default="5s,1s", help="heartbeat intervals in seconds (5s,1s), in order"
    )
    args = parser.parse_args(argv)
    for interval in args.intervals.split(","):
        print(run(interval, args.workers, args.window).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
