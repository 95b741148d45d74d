"""High availability: two coordinators on one PostgreSQL journal, one leader, one standby.

RELIABILITY.md guarantee 7 (with PostgreSQL) and guarantee 5 across failovers:

- only the leader reports health SERVING; a standby refuses RPCs with UNAVAILABLE and the
  leader's address in a ``google.rpc.ErrorInfo`` (``NOT_LEADER``);
- when the leader is SIGKILLed, the standby takes over within about one to two lease TTLs,
  workers and the client (given both addresses) follow it, the workflow completes, and the whole
  PostgreSQL journal satisfies the invariants of :mod:`tests.system.journal_check`;
- a standby whose wall clock is 5 minutes behind (``PLAIT_CLOCK_OFFSET=-5m``) still orders every
  event it writes after its predecessor's (its HLC starts above the journal's stored ceiling);
- a leader paused (SIGSTOP) while two of its leases run behind a gate is deposed; once resumed
  (past its leadership and those leases) it writes nothing more — its appends are fenced by the
  term — the journal it left stays as it was, and it exits. (An append is one statement, so a
  pause never leaves the leader row locked; the store-level fence itself is contract-tested in
  ``tests/contract/test_journal_contract.py``.)

Each test gets its own throwaway PostgreSQL server (:mod:`tests.system.pg`, ~1 s to start) and
the test timing profile (heartbeat 250 ms, lease TTL 2 s, kill grace 250 ms).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

import plait
from plait.errors import not_leader
from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from plait.v1 import workflow_service_pb2_grpc as ws_grpc
from tests import procs
from tests.system import journal_check, pg
from tests.system.harness import (
    ROOT,
    Cluster,
    Daemon,
    HarnessError,
    coordinator_argv,
    daemon_env,
    describe,
    wait_for,
)
from tests.system.invariants import hlc as invariants_hlc
from tests.system.invariants import show
from tests.system.recovery import NOT_SERVING, SERVING, health, lost_leases, marked

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(90),
    pytest.mark.usefixtures("workerd_available"),
]

TTL_S = 2.0
PLAIT = [sys.executable, "-m", "plait.cli.main"]
MINUTE_MS = 60_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class HaCluster(Cluster):
    """Coordinators ``c1``, ``c2``... on one PostgreSQL journal, and workers given them all.

    The PostgreSQL server is our descendant too (we are a subreaper); its process group is
    left out of the cluster's leak checks, and the ``pg_server`` fixture stops it.
    """

    dsn: str = ""
    foreign_pgids: set[int] = field(default_factory=set)
    addresses: dict[str, str] = field(default_factory=dict)
    current: str = ""

    # ----- coordinators ----------------------------------------------------------------------

    def start_named(self, name: str, env: dict[str, str] | None = None) -> str:
        """Starts coordinator ``name`` on a free port; returns once it answers health checks
        (SERVING as the leader or NOT_SERVING as a standby)."""
        address = f"127.0.0.1:{pg.free_port()}"
        argv = coordinator_argv(
            store=self.dsn,
            ready_file=self.tmp / f"{name}.ready.json",
            overrides={"--listen": address},
        )
        daemon = Daemon(name, argv, daemon_env(env), self.tmp / f"{name}.log")
        self.daemons[name] = daemon
        self.addresses[name] = address
        daemon.start()
        self._start_watcher()

        def probe() -> bool:
            if not daemon.running():
                raise AssertionError(f"{name} exited:\n{daemon.log_tail()}")
            return health(address) is not None

        wait_for(f"{name} to answer health checks", probe, timeout=30)
        return address

    def status(self, name: str) -> int | None:
        return health(self.addresses[name])

    def wait_leader(self, name: str, timeout: float) -> float:
        """Waits until ``name`` is SERVING; returns how long that took."""
        started = time.monotonic()
        wait_for(f"{name} to lead", lambda: self.status(name) == SERVING, timeout, 0.02)
        self.current = name
        self._reset_channel()
        return time.monotonic() - started

    @property
    def grpc_target(self) -> str:
        """What workers and clients are given: every coordinator, comma-separated."""
        return ",".join(self.addresses.values())

    def _reset_channel(self) -> None:
        # The harness's raw stubs (ListWorkers, histories) talk to the current leader.
        if self._channel is not None:
            self._channel.close()
        self._channel = grpc.insecure_channel(self.addresses[self.current])

    def client(self) -> plait.Client:
        return plait.Client(self.grpc_target, timeout=30)

    # ----- the journal ---------------------------------------------------------------------

    def rows(self) -> list[journal_check.Row]:
        return journal_check.read_postgres(self.dsn)

    def open_transactions(self) -> list[str]:
        """Other sessions' open transactions (a paused leader's would block elections)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, state, wait_event_type, wait_event, now() - xact_start,"
                " left(query, 80) FROM pg_stat_activity"
                " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
            ).fetchall()
        return [" | ".join(map(str, r)) for r in rows]

    def wait_renewals(self, count: int) -> None:
        """Waits until the leader row's lease has been renewed ``count`` times."""
        import psycopg

        seen: set[object] = set()
        with psycopg.connect(self.dsn, autocommit=True) as conn:

            def renewed() -> bool:
                row = conn.execute("SELECT expires_at FROM plait_leader").fetchone()
                seen.add(row[0] if row else None)
                return len(seen) > count

            wait_for(f"{count} leadership renewals", renewed, timeout=10 * TTL_S, interval=0.02)

    def leader_row(self) -> tuple[int, str, str]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT term, holder, address FROM plait_leader").fetchone()
        assert row is not None, "no plait_leader row"
        return int(row[0]), str(row[1]), str(row[2])

    # ----- leak checks: PostgreSQL is not ours to judge ----------------------------------

    def _record_groups(self) -> None:
        super()._record_groups()
        self._pgids -= self.foreign_pgids

    def _leftovers(self) -> list[procs.Proc]:
        return [p for p in super()._leftovers() if p.pgid not in self.foreign_pgids]

    def close(self) -> None:
        # Workers first, while a coordinator is still up to see them go.
        for daemon in self.daemons.values():
            if daemon.name.startswith("w"):
                daemon.stop()
        super().close()


@pytest.fixture
def pg_server() -> Iterator[pg.PgServer]:
    reason = pg.available()
    if reason is not None:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    server = pg.PgServer().start()
    try:
        yield server
    finally:
        server.stop()
        procs.reap_adopted_zombies()


@pytest.fixture
def ha(tmp_path: Path, pg_server: pg.PgServer, coordinator_available: None) -> Iterator[HaCluster]:
    assert pg_server.pgid is not None
    cluster = HaCluster(tmp_path, dsn=pg_server.dsn, foreign_pgids={pg_server.pgid})
    try:
        yield cluster
    finally:
        cluster.close()


def start_pair(ha: HaCluster, c2_env: dict[str, str] | None = None) -> None:
    """c1 leads, c2 stands by; two workers given both addresses."""
    ha.start_named("c1")
    ha.wait_leader("c1", timeout=15)
    ha.start_named("c2", env=c2_env)
    assert ha.status("c2") == NOT_SERVING
    ha.add_worker("w1", slots=4, wait=False)
    ha.add_worker("w2", slots=4, wait=False)
    ha.wait_workers(["w1", "w2"])


def fanout(
    marks: Path, width: int, long_s: float, name: str, gate: Path | None = None
) -> wf.WorkflowSpec:
    """src -> width short actions and 2 long ones -> end; each records its completion.

    The long ones sleep ``long_s``, or with ``gate`` wait until that file exists.
    """
    actions = [marked("src", marks, 0)]
    actions += [marked(f"s-{i}", marks, 0.1, ["src"]) for i in range(width)]
    actions += [marked(f"long-{k}", marks, long_s, ["src"], gate) for k in range(2)]
    ends = [f"s-{i}" for i in range(width)] + ["long-0", "long-1"]
    actions.append(marked("end", marks, 0, ends))
    return plait_workflow(name, actions)


def plait_workflow(name: str, actions: list[wf.ActionSpec]) -> wf.WorkflowSpec:
    return wf.WorkflowSpec(name=name, actions=actions)


def finished_count(rows: list[journal_check.Row]) -> int:
    return sum(r.type == wf.EVENT_TYPE_ACTION_FINISHED for r in rows)


def after(rows: list[journal_check.Row], sequence: int) -> list[wf.HistoryEvent]:
    return [r.event for r in rows if r.sequence > sequence]


def recorded_ms(event: wf.HistoryEvent) -> int:
    return event.recorded_at.seconds * 1000 + event.recorded_at.nanos // 1_000_000


# ----- (d) only the leader serves ---------------------------------------------------------------


def test_only_the_leader_serves_and_standby_names_it(ha: HaCluster) -> None:
    c1 = ha.start_named("c1")
    ha.wait_leader("c1", timeout=15)
    c2 = ha.start_named("c2")
    ha.wait_renewals(3)  # the standby stays one across a few of the leader's renewals
    assert (ha.status("c1"), ha.status("c2")) == (SERVING, NOT_SERVING)
    term, _, advertised = ha.leader_row()
    assert advertised == c1, f"leader row advertises {advertised!r}, c1 listens on {c1}"
    assert term >= 1

    with grpc.insecure_channel(c2) as channel:
        stub = ws_grpc.WorkflowServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListWorkflows(ws.ListWorkflowsRequest(page_size=1), timeout=5)
    err = raised.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "the standby's refusal carries no rich status"
    refusal = not_leader(status)
    assert refusal is not None, f"no NOT_LEADER ErrorInfo in {status}"
    assert refusal.leader == c1

    # A client given the standby first still reaches the leader.
    with plait.Client(f"{c2},{c1}", timeout=10) as client:
        client.list()
        assert client.target == c1


# ----- (a) SIGKILL the leader mid-workflow ------------------------------------------------------


def test_leader_sigkill_standby_takes_over(ha: HaCluster, tmp_path: Path) -> None:
    start_pair(ha)
    marks = tmp_path / "marks.txt"
    spec = fanout(marks, width=40, long_s=4.0, name="failover")
    with ha.client() as client:
        workflow_id = client.submit(spec).workflow_id
        wait_for("some progress", lambda: finished_count(ha.rows()) >= 8, timeout=30)
        before = ha.rows()
        killed_at = wall_ms()
        ha.kill("c1")
        takeover_s = ha.wait_leader("c2", timeout=6 * TTL_S)
        first = wait_for(
            "the new leader's first lease",
            lambda: next(
                (
                    e
                    for e in after(ha.rows(), before[-1].sequence)
                    if e.type == wf.EVENT_TYPE_ACTION_LEASED
                ),
                None,
            ),
            timeout=20,
        )
        status = client.wait(workflow_id, timeout=60)
    print(
        f"failover: standby SERVING {takeover_s:.2f}s after SIGKILL of the leader;"
        f" first lease {(recorded_ms(first) - killed_at) / 1000:.2f}s after it"
    )
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    assert takeover_s <= 2 * TTL_S + 1.0, f"takeover took {takeover_s:.2f}s (TTL {TTL_S}s)"
    term, _, advertised = ha.leader_row()
    assert advertised == ha.addresses["c2"] and term >= 2

    rows = ha.rows()
    assert rows[: len(before)] == before, "rows committed before the failover changed"
    summary = journal_check.check_journal(rows)
    assert summary.workflows == 1
    assert len(summary.committed) == len(spec.actions)
    journal_check.check_completed_attempts_committed(summary, journal_check.read_marks(marks))
    # A grant committed just before the SIGKILL that never reached its worker is not a lost
    # lease (recovery.lost_leases); under load the kill lands there now and then.
    lost = lost_leases(after(rows, before[-1].sequence))
    assert not lost, "leases lost although every worker followed the new leader:\n  " + (
        "\n  ".join(f"{show(e)} {e.message!r}" for e in lost)
    )


@pytest.mark.slow
def test_events_follow_survives_a_failover(ha: HaCluster, tmp_path: Path) -> None:
    """`plait events --follow`, given both addresses, follows one workflow's history across a
    leader's SIGKILL: every event once, in journal order, one reconnect line. (Apart from the
    test above, which holds the failover to losing no lease: one more process on a loaded
    2-core host shifts its timing.)"""
    start_pair(ha)
    spec = fanout(tmp_path / "marks.txt", width=12, long_s=3.0, name="follow")
    with ha.client() as client:
        workflow_id = client.submit(spec).workflow_id
        argv = [*PLAIT, "events", workflow_id, "--follow", "-o", "json"]
        follow = subprocess.Popen(
            [*argv, "--coordinator", ha.grpc_target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        guard = threading.Timer(120, follow.kill)  # ends a hang; the asserts say what failed
        guard.start()
        try:
            assert follow.stdout is not None and follow.stderr is not None
            first_line = follow.stdout.readline()  # it is being served: the kill is mid-stream
            wait_for("some progress", lambda: finished_count(ha.rows()) >= 4, timeout=30)
            ha.kill("c1")
            ha.wait_leader("c2", timeout=6 * TTL_S)
            status = client.wait(workflow_id, timeout=60)
            # The same text stream as first_line (communicate() would read the pipe itself and
            # lose what readline() buffered), stdout to its end first (more than a pipe holds).
            followed = follow.stdout.read()
            errors = follow.stderr.read()
            follow.wait(30)
        finally:
            guard.cancel()
            if follow.poll() is None:
                follow.kill()
                follow.wait()
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    assert follow.returncode == 0, errors
    assert errors.count("reconnecting for up to 60s") == 1, errors
    seen = [int(json.loads(line)["sequence"]) for line in [first_line, *followed.splitlines()]]
    history = [r.sequence for r in ha.rows() if r.event.workflow_id == workflow_id]
    assert seen == history, "events --follow lost or repeated events across the failover"


# ----- (b) the standby's clock is 5 minutes behind ----------------------------------------------


def test_standby_with_clock_behind_keeps_hlc_order(ha: HaCluster, tmp_path: Path) -> None:
    start_pair(ha, c2_env={"PLAIT_CLOCK_OFFSET": "-5m"})
    marks = tmp_path / "marks.txt"
    spec = fanout(marks, width=20, long_s=1.0, name="failover-skew")
    with ha.client() as client:
        workflow_id = client.submit(spec).workflow_id
        wait_for("some progress", lambda: finished_count(ha.rows()) >= 5, timeout=30)
        before = ha.rows()
        ha.kill("c1")
        ha.wait_leader("c2", timeout=6 * TTL_S)
        status = client.wait(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    rows = ha.rows()
    journal_check.check_journal(rows)  # I8 across the takeover, among the rest
    now = wall_ms()
    # The new leader's events are those stamped by its skewed wall clock (recorded_at); the
    # old leader may have committed a few more between our snapshot and its death.
    mine = [e for e in after(rows, before[-1].sequence) if recorded_ms(e) < now - 4 * MINUTE_MS]
    assert mine, (
        "no event recorded ~5 minutes in the past: the coordinator ignored"
        " PLAIT_CLOCK_OFFSET=-5m, so this test did not skew it"
    )
    old = [e for e in (r.event for r in rows) if recorded_ms(e) >= now - 4 * MINUTE_MS]
    assert max(e.sequence for e in old) < mine[0].sequence, "the two leaders' events interleave"
    # Its HLC continued above its predecessor's last stamp (near real time), never falling
    # back to its own wall clock.
    assert invariants_hlc(mine[0]) > max(invariants_hlc(e) for e in old), show(mine[0])
    for e in mine:
        assert e.hlc.physical_ms >= recorded_ms(e) + 4 * MINUTE_MS, (
            f"HLC fell back to the standby's wall clock: {show(e)}"
        )
    print(f"skewed standby: {len(mine)} events, all above its predecessor's {len(old)}")


# ----- (c) a deposed leader cannot write --------------------------------------------------------


def leased_and_started(rows: list[journal_check.Row], action_ids: set[str]) -> bool:
    started = {r.event.action_id for r in rows if r.type == wf.EVENT_TYPE_ACTION_STARTED}
    return action_ids <= started


@pytest.mark.parametrize("fence_only", [False, True], ids=["as-configured", "fence-only"])
def test_paused_leader_is_deposed_and_cannot_write(
    ha: HaCluster, tmp_path: Path, fence_only: bool
) -> None:
    """As configured, the woken leader concedes on its own clock before anything it decided
    commits. ``fence-only`` switches that off (``PLAIT_TEST_FENCE_ONLY``, a test hook), so the
    leader wakes believing it leads and commits what it decided: the term fence must refuse it,
    and that refusal is what stops it."""
    # The leader's clock is 5 minutes behind: anything it wrote after being deposed would show
    # (recorded_at minutes behind the new leader's).
    env = {"PLAIT_CLOCK_OFFSET": "-5m"} | ({"PLAIT_TEST_FENCE_ONLY": "1"} if fence_only else {})
    ha.start_named("c1", env=env)
    ha.wait_leader("c1", timeout=15)
    ha.start_named("c2")
    ha.add_worker("w1", slots=4, wait=False)
    ha.add_worker("w2", slots=4, wait=False)
    ha.wait_workers(["w1", "w2"])
    term_before, _, _ = ha.leader_row()
    marks = tmp_path / "marks.txt"
    gate = tmp_path / "gate"
    width = 4
    spec = fanout(marks, width=width, long_s=0, name="deposed", gate=gate)
    with ha.client() as client:
        workflow_id = client.submit(spec).workflow_id
        # The known point: every short action finished, both long ones running behind the
        # gate. Nothing more can happen until the test opens it, so the old leader holds two
        # live leases it must expire (write) when it wakes, however slow this machine is.
        wait_for(
            "the short actions to finish and both long ones to start",
            lambda: (
                (rows := ha.rows())
                and finished_count(rows) >= 1 + width
                and leased_and_started(rows, {"long-0", "long-1"})
            ),
            timeout=30,
        )
        ha.stop("c1")
        paused_at = time.monotonic()
        paused = ha.rows()
        try:
            try:
                ha.wait_leader("c2", timeout=6 * TTL_S)
            except HarnessError as err:
                raise AssertionError(
                    f"{err}: the standby could not be elected while the old leader was paused."
                    f"\nOpen transactions: {ha.open_transactions()}"
                ) from None
            # Elected: the leader row carries a new term, so from here on no write of the old
            # one's can commit (one still in flight at the pause committed before the election
            # or is refused).
            deposed = ha.rows()
            term, holder, advertised = ha.leader_row()
            assert term > term_before and advertised == ha.addresses["c2"], (term, holder)
            # The workers follow the new leader (their leases re-adopted, still running).
            ha.wait_workers(["w1", "w2"])
            # Paused for well over two TTLs: on waking, the old leader's leadership and both
            # its workers' leases have expired on its own monotonic clock.
            time.sleep(max(0.0, paused_at + 2.5 * TTL_S - time.monotonic()))
            resumed = ha.rows()
        finally:
            ha.cont("c1")
        # It wakes believing it leads, with leases to expire: it must write nothing and stop.
        code = ha.daemon("c1").wait(timeout=15)
        assert code is not None, "the resumed old leader is still running:\n" + (
            ha.daemon("c1").log_tail()
        )
        after_old = ha.rows()
        gate.touch()
        status = client.wait(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    log_c1 = ha.daemon("c1").log_tail()
    refused = f"journal write refused: term {term_before} superseded by {term}" in log_c1
    conceded = f"leadership lost (term {term_before}): stopping" in log_c1
    # As configured it may also have had a write in flight (refused); with the hook the fence
    # is the only thing that can have stopped it.
    stopped_by = refused if fence_only else conceded
    assert code == 1 and stopped_by, f"the deposed leader exited {code}; its log:\n{log_c1}"
    if fence_only:
        assert not conceded, log_c1
    print(
        f"the deposed leader exited {code}; terms {term_before} -> {term};"
        f" its write refused by the fence: {refused}; conceded on its own clock: {conceded}"
    )
    assert ha.daemon("c2").running() and ha.status("c2") == SERVING
    assert ha.leader_row()[0] == term, "another election happened"

    rows = ha.rows()
    # Nothing the old leader decided after waking reached the journal: what it had written is
    # a prefix, and everything after the election came from the new leader.
    assert rows[: len(paused)] == paused, "rows committed before the pause changed"
    assert after_old[: len(resumed)] == resumed, "rows committed while it was paused changed"
    skewed_ms = wall_ms() - 4 * MINUTE_MS
    stray = [e for e in after(rows, deposed[-1].sequence) if recorded_ms(e) < skewed_ms]
    assert not stray, "the deposed leader wrote after its successor took over:\n  " + (
        "\n  ".join(map(show, stray))
    )
    assert all(recorded_ms(r.event) < skewed_ms for r in paused), "c1 was not skewed"
    summary = journal_check.check_journal(rows)
    assert len(summary.committed) == len(spec.actions)
    journal_check.check_completed_attempts_committed(summary, journal_check.read_marks(marks))
