"""Capacity of one coordinator, measured: ``python -m tests.bench.capacity`` (make bench-capacity).

One runner over the existing benchmarks, every number from real processes and sockets, printed
as one Markdown table with the machine it ran on (``--json PATH`` writes every number too). It
is the source of docs/capacity.md. Sections (``--sections``, all by default):

  idle      coordinator CPU and RSS with 250, 500 and 1,000 protocol-level idle workers at the
            default 5 s heartbeat (``tests.bench.idle_workers``: one stream and TCP connection
            per worker, heartbeats spread over the interval)
  busy      coordinator CPU and RSS with 4 workerd x 50 slots (200 slots) running 1 s, 0.1 s
            and no-op handler actions: actions/s achieved against offered, CPU per action
  shapes    actions/s by shape at a modest size (``tests.bench.shapes`` on
            ``tests.bench.graphs``: fan-out + join, layered, chain, 10 ms sleeps, exec)
  journal   SQLite bytes per action (pages in use) and per event, RSS per finished action and
            per finished one-action workflow, no-ops/s on 2 workerd x 64 and the mean commit
            along a chain (both as PostgreSQL's rows), restart time (kill -9, start -> health
            SERVING) on an empty and a full journal, then ``--retention``: what its sweep prunes,
            the file's size and free pages, the restart after pruning, and a second batch
  memory    bytes per pending action in the scheduling core (``tests.bench.memory``)
  replay    replay time per million events (``tests.bench.replay``)
  postgres  on a durable PostgreSQL (fsync and synchronous commit on): actions/s, mean commit
            time along a chain, bytes per action, and failover time: kill -9 of the leader ->
            the standby SERVING -> a new one-action workflow done, with the test profile's 2 s
            lease TTL (several trials) and, without ``--quick``, once with the default 30 s
            (``tests.system.test_failover.HaCluster``, ``tests.system.pg``)

Medians where a run is cheap (shapes, restarts, replay, failovers: the count is in each row's
note); the idle and busy rows are one window each. The host's load average is printed at the
start and the end: on a shared machine every number moves with whatever else runs. Not a test:
nothing is asserted; it exits 1 only when a section failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.bench import idle_workers, replay, shapes, sizes
from tests.bench.graphs import Sizes
from tests.bench.graphs import shapes as all_shapes
from tests.system import pg
from tests.system.harness import (
    ROOT,
    Cluster,
    Daemon,
    Endpoints,
    coordinator_argv,
    daemon_env,
    wait_for,
)
from tests.system.recovery import health
from tests.system.specs import handler_action, workflow

if TYPE_CHECKING:
    from tests.system.test_failover import HaCluster

MIB = 1024 * 1024
NOOP = "tests.bench.noop_handlers:worker"
SLEEP = "tests.conformance.handlers:worker"  # "sleep": sleeps input.seconds
DEFAULTS: dict[str, str | None] = {  # the coordinator's own timings, not the test profile's
    "heartbeat_interval": None,
    "lease_ttl": None,
    "kill_grace": None,
}
REPLAYED = re.compile(r"replayed (\d+) events in ([\d.]+)s; serving ([\d.]+)s after start")
SECTIONS = ("idle", "busy", "shapes", "journal", "memory", "replay", "postgres")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- the arithmetic (pure; tests/unit/test_bench_capacity.py) --------------------------------


def per_million(total: float, count: int) -> float:
    """``total`` (bytes, seconds) scaled from ``count`` things to a million of them."""
    return total / count * 1_000_000


def share_of_core(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over wall seconds, in % of one core."""
    return 100.0 * cpu_s / wall_s


def workers_per_core(cpu_s_per_heartbeat: float, interval_s: float) -> float:
    """Idle workers one core keeps connected when each heartbeat, every ``interval_s``, costs
    ``cpu_s_per_heartbeat``."""
    return interval_s / cpu_s_per_heartbeat


def needed_share(actions_per_s: float, cpu_s_per_action: float) -> float:
    """% of one core the coordinator spends moving ``actions_per_s`` actions."""
    return 100.0 * actions_per_s * cpu_s_per_action


# ----- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured (or derived) number."""

    section: str
    what: str
    value: float
    unit: str
    note: str = ""


def fmt(value: float, unit: str) -> str:
    if value == int(value) and abs(value) < 100:
        text = f"{int(value)}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


@dataclass
class Report:
    """The rows so far, the machine, and the sections that failed."""

    rows: list[Row] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, section: str, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(section, what, value, unit, note))
        log(f"  {section}: {what}: {fmt(value, unit)}{'  (' + note + ')' if note else ''}")


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, load average, Python, commit, date."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": loadavg(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def render(report: Report, host: dict[str, Any]) -> None:
    print(
        f"Machine: {host['cores']} cores, {host['cpu']}, {host['memory_gib']} GiB;"
        f" Python {host['python']}; commit {host['commit']}; {host['date']}; load average"
        f" (1, 5, 15 min) {host['load_start']} at the start, {host['load_end']} at the end;"
        f" {host['runtime_s']:.0f} s in all."
    )
    print()
    print("| section | measurement | value | how |")
    print("| --- | --- | --- | --- |")
    for r in report.rows:
        print(f"| {r.section} | {r.what} | {fmt(r.value, r.unit)} | {r.note} |")
    for section, error in report.failed.items():
        print(f"| {section} | FAILED | - | {error.splitlines()[0][:200]} |")


# ----- shared helpers --------------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(prefix: str) -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix=f"plait-capacity-{prefix}-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            yield cluster
        finally:
            cluster.close()


def coordinator_pid(cluster: Cluster) -> int:
    assert cluster.endpoints is not None
    return cluster.endpoints.pid


def noop_workflow(name: str, n: int) -> wf.WorkflowSpec:
    return workflow(name, (handler_action(f"n{i}", "noop") for i in range(n)))


def sleep_workflow(name: str, n: int, seconds: float) -> wf.WorkflowSpec:
    return workflow(
        name,
        (
            wf.ActionSpec(id=f"s{i}", handler="sleep", input_json=json.dumps({"seconds": seconds}))
            for i in range(n)
        ),
    )


def chain_workflow(name: str, n: int) -> wf.WorkflowSpec:
    return workflow(
        name,
        (handler_action(f"c{i}", "noop", needs=[f"c{i - 1}"] if i else []) for i in range(n)),
    )


def run_ok(cluster: Cluster, spec: wf.WorkflowSpec, timeout: float = 300) -> shapes.PlaitRun:
    """Submits ``spec`` and waits for it (``tests.bench.shapes``); it must succeed."""
    run = shapes.submit_and_wait(cluster, spec, timeout)
    if run.state != "SUCCEEDED":
        raise RuntimeError(f"{spec.name} ended {run.state}")
    return run


def commit_stats(cluster: Cluster) -> tuple[float, float]:
    """(seconds, commits) so far from ``plait_journal_commit_seconds``."""
    return (
        cluster.metric("plait_journal_commit_seconds_sum"),
        cluster.metric("plait_journal_commit_seconds_count"),
    )


def chain_cost(cluster: Cluster, n: int) -> tuple[float, float]:
    """Runs a chain of ``n`` no-ops; returns (ms per step on the coordinator, mean ms per
    journal commit meanwhile)."""
    before = commit_stats(cluster)
    run = run_ok(cluster, chain_workflow(f"chain-{n}", n))
    after = commit_stats(cluster)
    commits = max(1.0, after[1] - before[1])
    return run.coordinator_s * 1000 / n, (after[0] - before[0]) / commits * 1000


def replay_line(daemon: Daemon) -> tuple[int, float] | None:
    """(events, seconds) of the daemon's last 'replayed N events in S s' log line."""
    found = REPLAYED.findall(daemon.log_path.read_text(errors="replace"))
    if not found:
        return None
    events, seconds, _ = found[-1]
    return int(events), float(seconds)


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


# ----- journal, restart, retention (SQLite) ----------------------------------------------------


@dataclass(frozen=True)
class JournalFile:
    """What the SQLite journal holds and takes on disk."""

    events: int
    payload_bytes: int
    file_bytes: int  # the database file plus its WAL, as they are on disk
    wal_bytes: int
    used_bytes: int  # pages in use (the WAL's included): the file after a checkpoint, less free
    free_pages: int
    pages: int

    @property
    def db_bytes(self) -> int:
        return self.file_bytes - self.wal_bytes

    @staticmethod
    def read(db: Path) -> JournalFile:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            events, payload = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM events"
            ).fetchone()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = Path(f"{db}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return JournalFile(
            events,
            payload,
            db.stat().st_size + wal_bytes,
            wal_bytes,
            (pages - free) * page_size,
            free,
            pages,
        )


def finished_workflows(cluster: Cluster) -> float:
    return cluster.metric("plait_workflows_finished_total")


def run_many(cluster: Cluster, specs: list[wf.WorkflowSpec], timeout: float = 600) -> float:
    """Submits every spec, then waits until the coordinator counts them all finished; returns
    the seconds from the first submit."""
    target = finished_workflows(cluster) + len(specs)
    start = time.perf_counter()
    for spec in specs:
        cluster.submit(spec)
    wait_for(
        f"{len(specs)} workflows to finish",
        lambda: finished_workflows(cluster) >= target,
        timeout=timeout,
        interval=0.2,
    )
    return time.perf_counter() - start


def restarts(cluster: Cluster, samples: int) -> tuple[float, float, int]:
    """Median (process start -> SERVING, replay seconds) over ``samples`` kill -9 restarts, and
    the events replayed."""
    from tests.system.test_restart import restart_coordinator

    serving, replayed, events = [], [], 0
    for _ in range(samples):
        serving.append(restart_coordinator(cluster))
        line = replay_line(cluster.daemon("coordinator"))
        if line is not None:
            events, seconds = line
            replayed.append(seconds)
    return statistics.median(serving), statistics.median(replayed or [0.0]), events


SQLITE = "journal (SQLite)"


def journal(
    report: Report, workflows: int, width: int, small: int, samples: int, fanout: int
) -> None:
    """One SQLite coordinator throughout: restart empty, grow, restart full, retention."""
    with local_cluster("journal") as cluster:
        cluster.start_coordinator(**DEFAULTS)
        empty_s, _, _ = restarts(cluster, samples)
        report.add(
            SQLITE,
            "restart, empty journal: kill -9, start -> health SERVING",
            empty_s,
            "s",
            f"median of {samples}; the process's start included (Python, imports, gRPC)",
        )
        for name in ("j-w1", "j-w2"):
            cluster.add_worker(
                name, slots=64, handlers=[NOOP], extra_args=["--no-exec", "--no-adaptive"]
            )
        run_ok(cluster, noop_workflow("journal-warmup", 200))
        growth(report, cluster, workflows, width, small)
        run = run_ok(cluster, noop_workflow("sqlite-fanout", fanout))
        report.add(
            SQLITE,
            f"{fanout:,} independent no-ops, 2 workerd x 64: actions/s",
            fanout / run.coordinator_s,
            "actions/s",
            "on the coordinator (submitted -> finished HLC); to compare with PostgreSQL's row",
        )
        ms_step, ms_commit = chain_cost(cluster, 300)
        report.add(
            SQLITE,
            "chain of 300 no-ops: one step",
            ms_step,
            "ms",
            f"mean journal commit {ms_commit:.2f} ms (WAL, synchronous=FULL: an fsync per commit)",
        )
        full = JournalFile.read(cluster.tmp / "plait.db")
        full_s, replay_s, _ = restarts(cluster, samples)
        report.add(
            SQLITE,
            f"restart, {full.events:,} events: kill -9, start -> health SERVING",
            full_s,
            "s",
            f"median of {samples}; of which replay {replay_s:.2f} s (the coordinator's log);"
            f" {full.file_bytes / MIB:.0f} MiB file",
        )
        retention(report, cluster, full, workflows, width, samples)


def growth(report: Report, cluster: Cluster, workflows: int, width: int, small: int) -> None:
    """Journal bytes and RSS per finished action, then per finished one-action workflow."""
    db, pid, actions = cluster.tmp / "plait.db", coordinator_pid(cluster), workflows * width
    before, rss0 = JournalFile.read(db), sizes.memory(pid)[0]
    secs = run_many(cluster, [noop_workflow(f"bulk-{i}", width) for i in range(workflows)])
    after, rss1 = JournalFile.read(db), sizes.memory(pid)[0]
    grown = after.used_bytes - before.used_bytes
    events = after.events - before.events
    report.add(
        SQLITE,
        "journal growth per million actions (pages in use, index included)",
        per_million(grown, actions) / 2**30,
        "GiB",
        f"{grown / actions:,.0f} bytes per action over {actions:,} no-op actions in"
        f" {workflows} workflows of {width:,} ({secs:.1f} s); {events / actions:.2f} events"
        f" per action, {(after.payload_bytes - before.payload_bytes) / events:.0f} bytes"
        f" of payload per event; on disk {after.file_bytes / MIB:.0f} MiB of which WAL"
        f" {after.wal_bytes / MIB:.1f} MiB (checkpointed every ~4 MiB, then reused)",
    )
    report.add(
        SQLITE,
        "coordinator RSS per finished action (kept until --retention)",
        (rss1 - rss0) / actions,
        "bytes",
        f"RSS {rss0 / MIB:.0f} -> {rss1 / MIB:.0f} MiB over those {actions:,} actions",
    )
    before = after
    secs = run_many(cluster, [noop_workflow(f"small-{i}", 1) for i in range(small)])
    after, rss2 = JournalFile.read(db), sizes.memory(pid)[0]
    report.add(
        SQLITE,
        "coordinator RSS per finished one-action workflow",
        (rss2 - rss1) / small,
        "bytes",
        f"{small:,} workflows submitted one after another by one client ({secs:.1f} s);"
        f" journal {(after.used_bytes - before.used_bytes) / small:,.0f} bytes per workflow",
    )


def retention(
    report: Report, cluster: Cluster, full: JournalFile, workflows: int, width: int, samples: int
) -> None:
    """Restarts the coordinator with ``--retention 2s``: what the sweep prunes, the restart
    after it, and what the same load does to the file once pruning keeps up."""
    from tests.system.test_restart import restart_coordinator

    db = cluster.tmp / "plait.db"

    def pruned_all() -> bool:
        return JournalFile.read(db).events == 0

    cluster.coordinator_overrides["--retention"] = "2s"
    restart_coordinator(cluster)
    started = time.perf_counter()
    wait_for("retention to prune every finished workflow", pruned_all, timeout=120, interval=0.2)
    pruned = JournalFile.read(db)
    report.add(
        SQLITE,
        f"--retention 2s: pages in use once its sweep pruned all {full.events:,} events",
        pruned.used_bytes / MIB,
        "MiB",
        f"pruned within {time.perf_counter() - started:.1f} s of the restart (polled every"
        f" 0.2 s); database file {full.db_bytes / MIB:.0f} -> {pruned.db_bytes / MIB:.0f} MiB"
        f" ({pruned.free_pages / max(1, pruned.pages) * 100:.0f} % free pages: SQLite reuses"
        f" freed pages, never returns them), WAL {pruned.wal_bytes / MIB:.0f} MiB",
    )
    pruned_s, replay_s, replayed = restarts(cluster, samples)
    report.add(
        SQLITE,
        "restart after pruning: kill -9, start -> health SERVING",
        pruned_s,
        "s",
        f"median of {samples}; {replayed:,} events replayed in {replay_s:.2f} s",
    )
    cluster.wait_workers(["j-w1", "j-w2"])
    secs = run_many(cluster, [noop_workflow(f"again-{i}", width) for i in range(workflows)])
    wait_for("retention to prune the second batch", pruned_all, timeout=120, interval=0.2)
    again = JournalFile.read(db)
    report.add(
        SQLITE,
        f"the same {workflows * width:,} actions again under --retention 2s: database file growth",
        (again.db_bytes - pruned.db_bytes) / MIB,
        "MiB",
        f"{pruned.db_bytes / MIB:.1f} -> {again.db_bytes / MIB:.1f} MiB (WAL"
        f" {pruned.wal_bytes / MIB:.0f} -> {again.wal_bytes / MIB:.0f} MiB) over"
        f" {secs:.0f} s: the file holds the largest retained window, not the history",
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


# ----- PostgreSQL: commits, throughput, failover -----------------------------------------------


def make_durable(server: pg.PgServer) -> None:
    """Restarts the throwaway server with fsync, synchronous commit and full-page writes on.

    ``pg.PgServer`` turns them off (the system tests kill coordinators, never PostgreSQL); a
    commit's cost is what this benchmark is after, so it pays for its fsync here.
    """
    pg_ctl = pg.find_bin("pg_ctl")
    assert pg_ctl is not None
    options = " ".join(
        [
            f"-p {server.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={server.dir}",
            "-c fsync=on",
            "-c synchronous_commit=on",
            "-c full_page_writes=on",
            "-c autovacuum=off",
            "-c max_parallel_workers_per_gather=0",
            "-c max_connections=50",
        ]
    )
    log_path = server.dir / "server.log"
    argv = [pg_ctl, "-D", str(server.data), "-l", str(log_path), "-o", options]
    done = server._run([*argv, "-m", "fast", "-w", "restart"])
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {done.stderr}\n{server.log_tail()}")
    server.pgid = os.getpgid(int((server.data / "postmaster.pid").read_text().split()[0]))
    server._wait_accepting()
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            row = conn.execute(f"SHOW {setting}").fetchone()
            if row is None or row[0] != "on":
                raise RuntimeError(f"PostgreSQL {setting} is {row}, not on")


def start_ha_coordinator(ha: HaCluster, name: str, overrides: dict[str, str | None]) -> None:
    """``HaCluster.start_named`` with flag overrides (the timings): starts coordinator ``name``
    on a free port and returns once it answers health checks."""
    address = f"127.0.0.1:{pg.free_port()}"
    argv = coordinator_argv(
        store=ha.dsn,
        ready_file=ha.tmp / f"{name}.ready.json",
        overrides={
            "--listen": address,
            **{"--" + k.replace("_", "-"): v for k, v in overrides.items()},
        },
    )
    daemon = Daemon(name, argv, daemon_env(), ha.tmp / f"{name}.log")
    ha.daemons[name] = daemon
    ha.addresses[name] = address
    daemon.start()
    ha._start_watcher()
    standing_by(ha, name)


def standing_by(ha: HaCluster, name: str) -> None:
    daemon = ha.daemons[name]

    def probe() -> bool:
        if not daemon.running():
            raise RuntimeError(f"{name} exited:\n{daemon.log_tail()}")
        return health(ha.addresses[name]) is not None

    wait_for(f"{name} to answer health checks", probe, timeout=30)


def lead(ha: HaCluster, name: str, timeout: float) -> float:
    """Waits until ``name`` serves; points the cluster's stubs and metrics at it."""
    took = ha.wait_leader(name, timeout)
    ready = ha.tmp / f"{name}.ready.json"

    def endpoints() -> Endpoints | None:
        try:
            data = json.loads(ready.read_text())
        except (OSError, ValueError):
            return None
        if data.get("role") != "leader":
            return None
        return Endpoints(grpc=data["grpc"], metrics=data["metrics"], pid=int(data["pid"]))

    ha.endpoints = wait_for(f"{name}'s ready file as leader", endpoints, timeout=10)
    return took


@dataclass(frozen=True)
class Failover:
    serving_s: float  # kill -9 of the leader -> the standby's health SERVING
    first_action_s: float  # kill -9 -> a new one-action workflow finished on the new leader
    replay_s: float
    events: int


def failover_once(ha: HaCluster, leader: str, standby: str, ttl_s: float) -> Failover:
    """Kills ``leader`` (SIGKILL), times the standby's takeover, then restarts the killed one
    as the new standby."""
    t0 = time.perf_counter()
    ha.kill(leader, signal.SIGKILL)
    lead(ha, standby, timeout=3 * ttl_s + 30)
    serving = time.perf_counter() - t0
    run_ok(ha, noop_workflow("after-failover", 1), timeout=60)
    first = time.perf_counter() - t0
    line = replay_line(ha.daemon(standby)) or (0, 0.0)
    ha.daemons[leader].start()
    standing_by(ha, leader)
    return Failover(serving, first, line[1], line[0])


def failovers(
    report: Report, ha: HaCluster, pair: tuple[str, str], ttl_s: float, trials: int, how: str
) -> None:
    results = []
    leader, standby = pair
    for i in range(trials):
        result = failover_once(ha, leader, standby, ttl_s)
        log(f"  failover {i + 1} (TTL {ttl_s:g} s): {result}")
        results.append(result)
        leader, standby = standby, leader
    serving = [r.serving_s for r in results]
    first = [r.first_action_s for r in results]
    report.add(
        "postgres",
        f"failover, lease TTL {ttl_s:g} s: kill -9 of the leader -> standby SERVING",
        statistics.median(serving),
        "s",
        f"{how}; each {', '.join(f'{s:.2f}' for s in serving)}; replay"
        f" {statistics.median([r.replay_s for r in results]):.2f} s of"
        f" {results[-1].events:,} events",
    )
    report.add(
        "postgres",
        f"failover, lease TTL {ttl_s:g} s: kill -9 -> a new action done on the new leader",
        statistics.median(first),
        "s",
        f"{how}; each {', '.join(f'{s:.2f}' for s in first)}; workers reconnect with"
        " --reconnect-backoff 50ms:1s",
    )


def ha_group(
    ha: HaCluster, names: tuple[str, str], workers: tuple[str, str], timings: dict[str, str | None]
) -> None:
    """Coordinators ``names`` (the first leads) and two no-op workers given both addresses."""
    start_ha_coordinator(ha, names[0], timings)
    lead(ha, names[0], timeout=60)
    start_ha_coordinator(ha, names[1], timings)
    for name in workers:
        ha.add_worker(
            name, slots=64, handlers=[NOOP], extra_args=["--no-exec", "--no-adaptive"], wait=False
        )
    ha.wait_workers(list(workers))


def pg_relation_bytes(dsn: str) -> tuple[int, int]:
    """(rows, bytes with indexes and TOAST) of ``plait_events``."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), pg_total_relation_size('plait_events') FROM plait_events"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def postgres(report: Report, fanout: int, trials: int, default_ttl_trial: bool) -> None:
    reason = pg.available()
    if reason is not None:
        raise RuntimeError(f"PostgreSQL unavailable: {reason}")
    from tests.system.test_failover import HaCluster

    server = pg.PgServer().start()
    try:
        make_durable(server)
        assert server.pgid is not None
        with tempfile.TemporaryDirectory(prefix="plait-capacity-pg-") as tmp:
            ha = HaCluster(Path(tmp), dsn=server.dsn, foreign_pgids={server.pgid})
            try:
                ha_group(ha, ("c1", "c2"), ("w1", "w2"), {})  # the test profile: TTL 2 s
                run_ok(ha, noop_workflow("pg-warmup", 200))
                rows0, bytes0 = pg_relation_bytes(server.dsn)
                run = run_ok(ha, noop_workflow("pg-fanout", fanout))
                rows1, bytes1 = pg_relation_bytes(server.dsn)
                report.add(
                    "postgres",
                    f"{fanout:,} independent no-ops, 2 workerd x 64: actions/s",
                    fanout / run.coordinator_s,
                    "actions/s",
                    "on the coordinator (submitted -> finished HLC); PostgreSQL on the same"
                    " host, fsync on",
                )
                report.add(
                    "postgres",
                    "journal growth per million actions (plait_events with its index)",
                    per_million(bytes1 - bytes0, fanout) / 2**30,
                    "GiB",
                    f"{(bytes1 - bytes0) / fanout:,.0f} bytes per action,"
                    f" {(rows1 - rows0) / fanout:.2f} events per action",
                )
                ms_step, ms_commit = chain_cost(ha, 300)
                report.add(
                    "postgres",
                    "chain of 300 no-ops: one step",
                    ms_step,
                    "ms",
                    f"mean journal commit {ms_commit:.2f} ms (one fenced INSERT statement,"
                    " synchronous_commit on)",
                )
                failovers(report, ha, ("c1", "c2"), 2.0, trials, f"median of {trials}")
            finally:
                ha.close()
        if default_ttl_trial:
            with tempfile.TemporaryDirectory(prefix="plait-capacity-pg30-") as tmp:
                ha = HaCluster(Path(tmp), dsn=server.dsn, foreign_pgids={server.pgid})
                try:
                    ha_group(ha, ("c3", "c4"), ("w3", "w4"), DEFAULTS)
                    failovers(report, ha, ("c3", "c4"), 30.0, 1, "1 trial")
                finally:
                    ha.close()
    finally:
        server.stop()
        procs.reap_adopted_zombies()


# ----- the runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of everything to run: the full plan or ``--quick``."""

    idle_counts: list[int]
    idle_window: float
    idle_base: float
    busy_loads: list[tuple[float, int]]
    shape_sizes: Sizes
    shape_keys: tuple[str, ...]
    shape_rounds: int
    journal_workflows: int
    journal_width: int
    small_workflows: int
    restart_samples: int
    memory_actions: int
    replay_events: int
    replay_rounds: int
    pg_fanout: int
    failover_trials: int
    default_ttl_trial: bool


FULL = Plan(
    idle_counts=[250, 500, 1000],
    idle_window=15.0,
    idle_base=5.0,
    busy_loads=[(1.0, 2_000), (0.1, 20_000), (0.0, 20_000)],
    shape_sizes=Sizes(fanout=5_000, layers=25, width=200, chain=1_000, sleeps=2_000, exec=1_000),
    shape_keys=("fanout", "layered", "chain", "sleeps", "exec4"),
    shape_rounds=3,
    journal_workflows=12,
    journal_width=2_500,
    small_workflows=2_000,
    restart_samples=3,
    memory_actions=100_000,
    replay_events=300_000,
    replay_rounds=3,
    pg_fanout=5_000,
    failover_trials=5,
    default_ttl_trial=True,
)
QUICK = Plan(
    idle_counts=[250, 1000],
    idle_window=8.0,
    idle_base=3.0,
    busy_loads=[(0.1, 8_000), (0.0, 8_000)],
    shape_sizes=Sizes(fanout=3_000, layers=15, width=200, chain=500, sleeps=1_000, exec=500),
    shape_keys=("fanout", "layered", "chain", "sleeps"),
    shape_rounds=1,
    journal_workflows=4,
    journal_width=2_500,
    small_workflows=300,
    restart_samples=2,
    memory_actions=50_000,
    replay_events=100_000,
    replay_rounds=2,
    pg_fanout=2_000,
    failover_trials=3,
    default_ttl_trial=False,
)


def sections(plan: Plan) -> dict[str, Callable[[Report], None]]:
    return {
        "idle": lambda r: idle(r, plan.idle_counts, plan.idle_window, plan.idle_base),
        "busy": lambda r: busy(r, 4, 50, plan.busy_loads),
        "shapes": lambda r: shapes_section(r, plan.shape_sizes, plan.shape_keys, plan.shape_rounds),
        "journal": lambda r: journal(
            r,
            plan.journal_workflows,
            plan.journal_width,
            plan.small_workflows,
            plan.restart_samples,
            plan.pg_fanout,
        ),
        "memory": lambda r: memory_section(r, plan.memory_actions),
        "replay": lambda r: replay_section(r, plan.replay_events, plan.replay_rounds),
        "postgres": lambda r: postgres(
            r, plan.pg_fanout, plan.failover_trials, plan.default_ttl_trial
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (~2 min)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}"
    )
    p.add_argument("--json", type=Path, help="write the machine and every row here")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")

    procs.become_subreaper()
    started = time.perf_counter()
    host = machine()
    log(f"capacity: {host}")
    report = Report()
    runners = sections(QUICK if args.quick else FULL)
    timings: dict[str, float] = {}
    for name in chosen:
        log(f"== {name} (load {loadavg()})")
        t0 = time.perf_counter()
        try:
            runners[name](report)
        except (Exception, SystemExit) as err:  # a failed section is a row, not a lost table
            report.failed[name] = f"{type(err).__name__}: {err}"
            log(f"  {name} FAILED: {str(err)[-2000:]}")
        timings[name] = time.perf_counter() - t0
        log(f"  {name}: {timings[name]:.0f} s")
    host["load_end"] = loadavg()
    host["runtime_s"] = time.perf_counter() - started
    host["section_s"] = {k: round(v, 1) for k, v in timings.items()}
    host["plan"] = "quick" if args.quick else "full"
    render(report, host)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": host,
                    "rows": [asdict(r) for r in report.rows],
                    "failed": report.failed,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
