"""Capacity sections ``shapes``, ``memory`` and ``replay``: the existing benches, each run and
summarised as rows (``tests.bench.shapes`` on ``tests.bench.graphs``, ``tests.bench.memory``,
``tests.bench.replay``)."""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import replay, shapes
from tests.bench.capacity.table import Report, log
from tests.bench.graphs import Sizes
from tests.bench.graphs import shapes as all_shapes
from tests.system.harness import ROOT

# ----- shapes ----------------------------------------------------------------------------------


def shapes_section(report: Report, size: Sizes, keys: tuple[str, ...], rounds: int) -> None:
    selected = [s for s in all_shapes(size) if s.key in keys]
    runs: dict[str, list[shapes.PlaitRun]] = {s.key: [] for s in selected}
    for r in range(rounds):
        for shape in selected:
            run = shapes.run_shape(shape, timeout=300)
            if run.state != "SUCCEEDED":
                raise RuntimeError(f"{shape.key} ended {run.state}")
            runs[shape.key].append(run)
            log(f"  round {r + 1} {shape.key}: {shape.score(run.end_to_end_s):,.2f}")
    for shape in selected:
        e2e = [shape.score(x.end_to_end_s) for x in runs[shape.key]]
        coord = [shape.score(x.coordinator_s) for x in runs[shape.key]]
        report.add(
            "shapes",
            f"{shape.title} ({shape.workers} workerd x {shape.slots})",
            statistics.median(e2e),
            shape.unit.value,
            f"end to end, median of {rounds} (each {', '.join(f'{v:,.2f}' for v in e2e)});"
            f" on the coordinator {statistics.median(coord):,.2f}",
        )


# ----- memory, replay --------------------------------------------------------------------------


def memory_section(report: Report, n: int) -> None:
    for shape in ("layered", "flat"):
        argv = [sys.executable, "-m", "tests.bench.memory", f"--actions={n}", "--one", shape]
        rss = int(subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        traced = subprocess.run(
            [*argv, "--traced"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        py = int(traced.stdout)
        what = "layers of 200, 2 needs each" if shape == "layered" else "independent, all READY"
        report.add(
            "memory",
            f"per pending action, {n:,} in one workflow ({what})",
            rss / n,
            "bytes",
            f"RSS growth in a fresh core; {py / n:,.0f} of them Python objects (tracemalloc)",
        )


def replay_section(report: Report, events: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="plait-capacity-replay-") as tmp:
        path = Path(tmp) / "plait.db"
        started = time.perf_counter()
        built = asyncio.run(replay.build(path, events))
        build_s = time.perf_counter() - started
        wal = Path(f"{path}-wal")
        size = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        rates, cpus = [], []
        for _ in range(rounds):
            gc.collect()
            n, seconds, cpu = asyncio.run(replay.replay_once(path))
            rates.append(n / seconds)
            cpus.append(n / cpu)
    rate = statistics.median(rates)
    report.add(
        "replay",
        "replay time per million events (SQLite, Runtime.start)",
        1_000_000 / rate,
        "s",
        f"median of {rounds} over a {built:,}-event journal ({size / built:.0f} bytes per event,"
        f" built in {build_s:.0f} s): {rate:,.0f} events/s, {statistics.median(cpus):,.0f}"
        " per CPU second",
    )
