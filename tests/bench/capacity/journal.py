"""Capacity section ``journal``: one SQLite coordinator throughout. Its restart (kill -9, start
-> health SERVING) on an empty journal, what the journal and the RSS grow by per finished action
and per finished one-action workflow, no-ops/s and the mean commit (as PostgreSQL's rows), the
restart on the full journal, then ``--retention``: what its sweep prunes, the restart after it,
and a second batch."""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from plait.v1 import workflow_pb2 as wf
from tests.bench import sizes
from tests.bench.capacity.common import (
    DEFAULTS,
    MIB,
    NOOP,
    chain_cost,
    coordinator_pid,
    local_cluster,
    noop_workflow,
    replay_line,
    run_ok,
)
from tests.bench.capacity.table import Report, per_million
from tests.system.harness import Cluster, wait_for


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
