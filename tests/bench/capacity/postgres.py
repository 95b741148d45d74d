"""Capacity section ``postgres``: on a durable PostgreSQL (fsync and synchronous commit on),
actions/s, journal bytes per action, the mean commit along a chain, and failover time: kill -9
of the leader -> the standby SERVING -> a new one-action workflow done, at the test profile's
2 s lease TTL and at the default 30 s (``tests.system.test_failover.HaCluster``,
``tests.system.pg``)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests import procs
from tests.bench.capacity.common import (
    DEFAULTS,
    NOOP,
    chain_cost,
    noop_workflow,
    replay_line,
    run_ok,
)
from tests.bench.capacity.table import Report, log, per_million
from tests.system import pg
from tests.system.harness import Daemon, Endpoints, coordinator_argv, daemon_env, wait_for
from tests.system.recovery import health

if TYPE_CHECKING:
    from tests.system.test_failover import HaCluster


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
