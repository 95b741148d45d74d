"""What the workflow API costs the coordinator: ``python -m tests.bench.submit``.

Starts a real coordinator in this process (grpc.aio on 127.0.0.1, a SQLite journal in a temp
dir, no workers) and measures, each over ``--rounds`` fresh coordinators:

  (a) one big submit (``--actions``, default 100,000, in layers of 200 that each need 2 of the
      layer before): the SubmitWorkflow call's time, the longest the coordinator's event loop
      went without running a 1 ms ticker during it (how long it was blocked), and the latency
      of a cheap RPC (``ListWorkers``) pinged every 5 ms meanwhile (what a heartbeat would see);
      plus ``validate_submit`` on its own, for reference;
  (b) ``ListWorkflows`` of ``--workflows`` workflows of ``--per-workflow`` actions each (100 x
      1,000 by default): milliseconds per call (page_size 100, every workflow in one page).

Prints the numbers and their medians; not a test (timing goals stay in benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc.aio

from plait.coordinator.config import CoordinatorConfig, Limits
from plait.coordinator.server import CoordinatorServer
from plait.spec.validate import validate_submit
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc

LAYER = 200
CALL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
T = TypeVar("T")


def layered(n: int, seed: int = 1) -> pb.WorkflowSpec:
    """``n`` handler actions in layers of 200, each needing 2 of the previous layer's."""
    rng = random.Random(seed)
    spec = pb.WorkflowSpec(name=f"bench-{n}")
    for i in range(n):
        a = spec.actions.add(id=f"a{i}", handler="noop")
        layer = i // LAYER
        if layer:
            below = range((layer - 1) * LAYER, layer * LAYER)
            a.needs.extend(f"a{j}" for j in rng.sample(below, 2))
    return spec


def flat(name: str, n: int) -> pb.WorkflowSpec:
    """``n`` independent handler actions."""
    spec = pb.WorkflowSpec(name=name)
    for i in range(n):
        spec.actions.add(id=f"a{i}", handler="noop")
    return spec


async def with_coordinator(fn: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
    """Runs ``fn`` against a fresh coordinator in this process, then stops it."""
    with tempfile.TemporaryDirectory(prefix="plait-bench-submit-") as tmp:
        server = CoordinatorServer(
            CoordinatorConfig(
                listen="127.0.0.1:0",
                store=f"sqlite:///{Path(tmp)}/journal.db",
                heartbeat_interval=timedelta(seconds=5),
                lease_ttl=timedelta(seconds=30),
            )
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", options=CALL_OPTIONS
            ) as channel:
                return await fn(channel)
        finally:
            await server.stop(0)


class LoopLag:
    """A 1 ms ticker on the running loop: the longest gap between two ticks while active."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.active = False
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            if self.active:
                self.worst = max(self.worst, now - last)
            last = now

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def big_submit(channel: grpc.aio.Channel, spec: pb.WorkflowSpec) -> dict[str, float]:
    """One submit of ``spec`` with the loop ticker and a pinger running beside it."""
    workflows = wsgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    admin = agrpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
    await admin.ListWorkers(apb.ListWorkersRequest())  # warm the channel
    pings: list[float] = []
    submitting = True

    async def pinger() -> None:
        while submitting:
            t0 = time.perf_counter()
            await admin.ListWorkers(apb.ListWorkersRequest())
            pings.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)

    request = wspb.SubmitWorkflowRequest(spec=spec)
    with LoopLag() as lag:
        ping_task = asyncio.get_running_loop().create_task(pinger())
        await asyncio.sleep(0.05)
        pings.clear()
        lag.active = True
        t0 = time.perf_counter()
        reply = await workflows.SubmitWorkflow(request, timeout=600)
        took = time.perf_counter() - t0
        lag.active = False
        submitting = False
        await ping_task
    assert reply.created, reply
    return {
        "submit_s": took,
        "loop_block_ms": lag.worst * 1000,
        "ping_max_ms": max(pings, default=0.0) * 1000,
        "ping_p50_ms": statistics.median(pings) * 1000 if pings else 0.0,
        "pings": len(pings),
    }


async def list_cost(
    channel: grpc.aio.Channel, workflows_n: int, per: int, calls: int
) -> dict[str, float]:
    """Milliseconds per ListWorkflows call over ``workflows_n`` workflows of ``per`` actions."""
    stub = wsgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    for i in range(workflows_n):
        await stub.SubmitWorkflow(wspb.SubmitWorkflowRequest(spec=flat(f"wf{i}", per)))
    request = wspb.ListWorkflowsRequest(page_size=100)
    reply = await stub.ListWorkflows(request)
    assert sum(reply.workflows[0].action_counts.values()) == per, reply.workflows[0]
    t0 = time.perf_counter()
    for _ in range(calls):
        await stub.ListWorkflows(request)
    return {"list_ms": (time.perf_counter() - t0) / calls * 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--actions", type=int, default=100_000)
    p.add_argument("--workflows", type=int, default=100)
    p.add_argument("--per-workflow", type=int, default=1000)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    spec = layered(args.actions)
    t0 = time.perf_counter()
    validate_submit(spec, "", Limits())
    validate_s = time.perf_counter() - t0
    print(f"validate_submit alone ({args.actions} actions): {validate_s:.3f} s")

    subs: list[dict[str, float]] = []
    lists: list[dict[str, float]] = []
    for r in range(args.rounds):
        s = asyncio.run(with_coordinator(lambda ch: big_submit(ch, spec)))
        print(
            f"round {r + 1}: submit {s['submit_s']:.3f} s, loop blocked up to"
            f" {s['loop_block_ms']:.0f} ms, ping p50 {s['ping_p50_ms']:.1f} ms max"
            f" {s['ping_max_ms']:.0f} ms ({s['pings']:.0f} pings)"
        )
        subs.append(s)
        ls = asyncio.run(
            with_coordinator(
                lambda ch: list_cost(ch, args.workflows, args.per_workflow, args.calls)
            )
        )
        print(
            f"round {r + 1}: ListWorkflows of {args.workflows} x {args.per_workflow}:"
            f" {ls['list_ms']:.2f} ms per call"
        )
        lists.append(ls)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(
        f"median: submit {med(subs, 'submit_s'):.3f} s, loop blocked up to"
        f" {med(subs, 'loop_block_ms'):.0f} ms, ping max {med(subs, 'ping_max_ms'):.0f} ms;"
        f" ListWorkflows {med(lists, 'list_ms'):.2f} ms per call"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
