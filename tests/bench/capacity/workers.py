"""Capacity sections ``idle`` and ``busy``: the coordinator's CPU and RSS with idle workers
heartbeating (``tests.bench.idle_workers``), and with workerd slots running actions."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.bench import idle_workers, sizes
from tests.bench.capacity.common import (
    DEFAULTS,
    MIB,
    NOOP,
    SLEEP,
    coordinator_pid,
    local_cluster,
    noop_workflow,
    run_ok,
    sleep_workflow,
)
from tests.bench.capacity.table import Report, share_of_core, workers_per_core

# ----- idle workers ----------------------------------------------------------------------------


async def idle_with_rss(
    target: str, pid: int, workers: int, window: float, base: float
) -> tuple[idle_workers.Measured, int]:
    """``idle_workers.measure``, with the coordinator's largest RSS sampled meanwhile."""
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sizes.memory(pid)[0])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    sampler = asyncio.create_task(sample())
    try:
        measured = await idle_workers.measure(target, pid, workers, window, base)
    finally:
        done.set()
        await sampler
    return measured, peak


def idle(report: Report, counts: list[int], window: float, base_window: float) -> None:
    best: tuple[int, float, float] | None = None  # (workers, net s per heartbeat, interval)
    for n in counts:
        with local_cluster("idle") as cluster:
            ep = cluster.start_coordinator(**DEFAULTS)
            rss0 = sizes.memory(ep.pid)[0]
            base = idle_workers.idle_share(ep.pid, base_window)
            m, rss = asyncio.run(idle_with_rss(ep.grpc, ep.pid, n, window, base))
        net_s = max(0.0, m.share - base) * m.window / max(1, m.heartbeats)
        gross_us = m.cpu / max(1, m.heartbeats) * 1e6
        report.add(
            "idle workers",
            f"{n:,} idle workers, heartbeat {m.interval:g} s: coordinator CPU",
            m.share * 100,
            "% of a core",
            f"{m.window:.0f} s window, {m.heartbeats:,} heartbeats all acked; {gross_us:.0f} µs"
            f" per heartbeat, {net_s * 1e6:.0f} µs net of the idle coordinator's"
            f" {base * 100:.1f} %",
        )
        report.add(
            "idle workers",
            f"{n:,} idle workers: coordinator RSS",
            rss / MIB,
            "MiB",
            f"idle coordinator {rss0 / MIB:.0f} MiB; {(rss - rss0) / n / 1024:.1f} KiB per worker",
        )
        if net_s > 0 and (best is None or n > best[0]):
            best = (n, net_s, m.interval)
    if best is not None:
        n, net_s, interval = best
        report.add(
            "idle workers",
            f"idle workers one core could hold at a {interval:g} s heartbeat (derived)",
            workers_per_core(net_s, interval),
            "workers",
            f"{interval:g} s / {net_s * 1e6:.0f} µs per heartbeat (from the {n:,}-worker row);"
            " a ceiling, before any action runs",
        )


# ----- busy workers ----------------------------------------------------------------------------


def busy(report: Report, workers: int, slots: int, loads: list[tuple[float, int]]) -> None:
    total = workers * slots
    with local_cluster("busy") as cluster:
        cluster.start_coordinator(**DEFAULTS)
        names = [f"busy-w{i + 1}" for i in range(workers)]
        for name in names:
            cluster.add_worker(
                name,
                slots=slots,
                handlers=[NOOP, SLEEP],
                extra_args=["--no-exec", "--no-adaptive"],
                wait=False,
            )
        cluster.wait_workers(names)
        pid = coordinator_pid(cluster)
        run_ok(cluster, noop_workflow("busy-warmup", 2 * total))
        rss0 = sizes.memory(pid)[0]
        for seconds, n in loads:
            spec = (
                sleep_workflow(f"busy-{seconds:g}s", n, seconds)
                if seconds
                else noop_workflow("busy-noop", n)
            )
            cpu0, t0 = idle_workers.cpu_seconds(pid), time.perf_counter()
            run = run_ok(cluster, spec)
            cpu, wall = idle_workers.cpu_seconds(pid) - cpu0, time.perf_counter() - t0
            rss = sizes.memory(pid)[0]
            rate = n / run.coordinator_s
            offered = f"offered {total / seconds:,.0f}/s" if seconds else "no-op: all it can"
            what = (
                f"{workers} workerd x {slots} slots, {seconds:g} s actions"
                if seconds
                else f"{workers} workerd x {slots} slots, no-op actions"
            )
            report.add(
                "busy workers",
                f"{what}: actions/s",
                rate,
                "actions/s",
                f"{n:,} actions, {offered}; coordinator {share_of_core(cpu, wall):.0f} % of a core"
                f" ({cpu / n * 1e6:.0f} µs CPU per action, the submit included); RSS"
                f" {rss / MIB:.0f} MiB ({rss0 / MIB:.0f} before)",
            )
            if not seconds:
                report.add(
                    "busy workers",
                    "actions/s per core of coordinator CPU (derived)",
                    n / cpu,
                    "actions/s",
                    f"{n:,} no-op actions / {cpu:.1f} CPU s of the coordinator (every thread)",
                )
