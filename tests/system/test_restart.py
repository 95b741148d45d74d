"""The coordinator is SIGKILLed and restarted on its SQLite journal: no acknowledged work is lost.

RELIABILITY.md guarantee 7: the coordinator rebuilds its state by replaying the journal, gives
live leases a fresh TTL, and re-adopts the leases its workers report when they reconnect;
workers re-send results until they are acked, and acks follow the commit. So after any number
of crashes (also mid-commit), each action has exactly one committed outcome, every attempt that
ran to completion on a worker that stayed up is the one committed (I3 from outside), a lease
whose worker reconnected is not lost (no EVENT_TYPE_LEASE_LOST, same fencing token), the file
passes ``PRAGMA integrity_check``, and the whole journal — across the restarts — satisfies the
invariants of :mod:`tests.system.journal_check`.

Timing profile: heartbeat 250 ms and kill grace 250 ms as in the test profile, but a 10 s lease
TTL. A worker self-fences once no heartbeat has been acked for TTL - kill grace - heartbeat
(1.5 s with the 2 s test TTL); a SIGKILLed Python coordinator takes about that long to come back
on two busy cores (see ``test_restart_to_serving_and_replay_speed``), so with 2 s every
long-running attempt would be killed by its own worker and the re-adoption under test could not
happen; under a loaded CI host a restart took more than the 4.5 s that a 5 s TTL leaves. Nothing
here waits for a lease to expire, so the longer TTL costs no time. Production TTLs (30 s) leave
more room still.

Random moments come from a seeded ``random.Random``; the seed is printed and in the failure
message, and ``PLAIT_TEST_SEED`` replays a run.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest

import plait
from plait.v1 import workflow_pb2 as wf
from tests.system import journal_check, pg
from tests.system.harness import (
    Cluster,
    Daemon,
    coordinator_argv,
    daemon_env,
    describe,
    handler_action,
    wait_for,
    workflow,
)
from tests.system.invariants import show
from tests.system.recovery import NOT_SERVING, SERVING, health, lost_leases, marked

pytestmark = [
    pytest.mark.system,
    pytest.mark.usefixtures("workerd_available"),
]

RESTART_PROFILE = {"lease_ttl": "10s", "heartbeat_interval": "250ms", "kill_grace": "250ms"}
HANDLERS = "tests.system.restart_handlers:worker"
SEED = int(os.environ.get("PLAIT_TEST_SEED", "20261128"))


def db(cluster: Cluster) -> Path:
    return cluster.tmp / "plait.db"


class LockTries:
    """Counts the opens of a SQLite journal's lock file, by any process (inotify).

    A standby coordinator opens it once a campaign poll, tries the lock and closes it; the
    leader keeps the one descriptor it won with. So, while a leader lives, each open is one
    poll a standby lost. (Closes are watched too: identical events in a row would merge.)
    """

    IN_CLOSE_WRITE, IN_OPEN = 0x08, 0x20

    def __init__(self, path: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_OPEN | self.IN_CLOSE_WRITE
        if self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {path}")
        self._opens = 0

    def count(self) -> int:
        """Opens seen since the watch began."""
        while True:
            try:
                buf = os.read(self._fd, 4096)
            except BlockingIOError:
                return self._opens
            offset = 0
            while offset < len(buf):  # struct inotify_event: wd, mask, cookie, len, name
                _, mask, _, size = struct.unpack_from("iIII", buf, offset)
                self._opens += bool(mask & self.IN_OPEN)
                offset += 16 + size

    def __enter__(self) -> LockTries:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def restart_coordinator(cluster: Cluster) -> float:
    """SIGKILLs the coordinator and starts it again on its ports; returns the seconds from
    the new process's start to health SERVING."""
    cluster.kill("coordinator")
    started = time.monotonic()
    cluster.restart("coordinator")
    wait_for(
        "the restarted coordinator to be SERVING",
        lambda: health(cluster.grpc_target) == SERVING,
        timeout=30,
        interval=0.02,
    )
    return time.monotonic() - started


def no_lease_lost(rows: list[journal_check.Row]) -> None:
    """No lease a worker held was lost, though every worker came back (recovery.lost_leases)."""
    lost = lost_leases([r.event for r in rows])
    assert not lost, (
        f"{len(lost)} lease(s) lost across restarts although every worker came back:\n  "
        + ("\n  ".join(f"{show(e)} ({e.message})" for e in lost[:20]))
    )


# ----- (a) a long fan-out/join workflow over three workers, three coordinator crashes ---------

LONG = 4
LONG_S = 9.0


def fanout_spec(marks: Path) -> wf.WorkflowSpec:
    """~300 short exec actions in three fan-out stages joined by barriers, plus LONG actions
    that run across the restarts; every action records its completion in ``marks``."""
    actions = [marked("src", marks, 0, [])]
    actions += [marked(f"long-{k}", marks, LONG_S, ["src"]) for k in range(LONG)]
    previous = "src"
    for stage, width in (("a", 100), ("b", 100), ("c", 90)):
        ids = [f"{stage}-{i}" for i in range(width)]
        actions += [marked(i, marks, 0.02, [previous]) for i in ids]
        actions.append(marked(f"join-{stage}", marks, 0, ids))
        previous = f"join-{stage}"
    actions.append(marked("end", marks, 0, [previous, *(f"long-{k}" for k in range(LONG))]))
    return workflow("restart-fanout", actions)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigkilled_coordinator_recovers_and_readopts_leases(
    cluster: Cluster, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    cluster.start_coordinator(**RESTART_PROFILE)
    workers = ["w1", "w2", "w3"]
    for name in workers:
        cluster.add_worker(name, slots=4, wait=False)
    cluster.wait_workers(workers)
    marks = tmp_path / "marks.txt"
    spec = fanout_spec(marks)
    assert 290 <= len(spec.actions) <= 310
    workflow_id = cluster.submit(spec)
    # Every long action runs before the first crash (started: not waiting in a worker's queue,
    # from where it could still be reclaimed for an idle worker).
    wait_for(
        "the long actions to start",
        lambda: (
            {
                e.action_id
                for e in cluster.history(workflow_id)
                if e.type == wf.EVENT_TYPE_ACTION_STARTED and e.action_id.startswith("long-")
            }
            == {f"long-{k}" for k in range(LONG)}
        ),
    )

    restarts = []
    for crash in range(3):
        time.sleep(rng.uniform(0.2, 1.0))
        status = cluster.get(workflow_id)
        assert status.state == wf.WORKFLOW_STATE_RUNNING, (
            f"seed {SEED}: the workflow ended before crash {crash + 1}; the test needs more work"
        )
        restarts.append(restart_coordinator(cluster))
        cluster.wait_workers(workers, timeout=10)

    status = cluster.wait_workflow(workflow_id, timeout=60)
    print(f"restart to SERVING under load: {', '.join(f'{s:.2f}s' for s in restarts)}")
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, f"seed {SEED}: {describe(status)}"

    rows = journal_check.read_sqlite(db(cluster))
    summary = journal_check.check_sqlite_journal(db(cluster))
    assert summary.workflows == 1
    assert len([k for k in summary.committed if k[0] == workflow_id]) == len(spec.actions)
    # The long actions ran across every crash on the same lease: re-adopted, never re-leased
    # (but for a lease handed back unstarted from a worker's queue before it ran).
    handed_back = {
        (r.event.workflow_id, r.event.action_id, r.event.fencing_token)
        for r in rows
        if r.event.type == wf.EVENT_TYPE_LEASE_LOST and r.event.reason == wf.EVENT_REASON_RECLAIMED
    }
    for k in range(LONG):
        key = (workflow_id, f"long-{k}")
        history = [f"{show(e)} {e.message!r}" for e in summary.history[key]]
        ran = [x for x in summary.leases[key] if (*key, x.fencing_token) not in handed_back]
        assert len(ran) == 1, f"seed {SEED}: long-{k} re-leased: {history}"
        assert summary.committed[key].fencing_token == ran[0].fencing_token
    journal_check.check_completed_attempts_committed(summary, journal_check.read_marks(marks))
    no_lease_lost(rows)


# ----- (b) SIGKILL while results are being committed, many times -------------------------------


def handler_spec(iteration: int) -> wf.WorkflowSpec:
    """LEAVES independent no-op handler actions, joins of 10, and a final join."""
    leaves = [handler_action(f"n-{i}", "noop") for i in range(LEAVES)]
    joins = [
        handler_action(f"j-{g}", "noop", needs=[f"n-{i}" for i in range(g * 10, g * 10 + 10)])
        for g in range(LEAVES // 10)
    ]
    final = handler_action("final", "noop", needs=[f"j-{g}" for g in range(LEAVES // 10)])
    return workflow(f"commit-crash-{iteration}", [*leaves, *joins, final])


ITERATIONS = 15
LEAVES = 200
ACTIONS = LEAVES + LEAVES // 10 + 1


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_commits(cluster: Cluster, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    print(f"seed {SEED + 1}")
    marks = tmp_path / "marks.txt"
    cluster.start_coordinator(**RESTART_PROFILE)
    cluster.add_worker(
        "w1",
        slots=8,
        handlers=[HANDLERS],
        env={"PLAIT_TEST_MARKS": str(marks)},
        extra_args=["--no-exec"],
    )
    mid_run = 0
    workflow_ids = []
    for iteration in range(ITERATIONS):
        workflow_id = cluster.submit(handler_spec(iteration))
        workflow_ids.append(workflow_id)
        time.sleep(rng.uniform(0.0, 0.25))
        cluster.kill("coordinator")
        # What the crash left behind: an intact file whose journal is a consistent prefix.
        at_crash = journal_check.check_sqlite_journal(db(cluster), require_finished=False)
        mid_run += at_crash.finished_workflows == iteration
        cluster.restart("coordinator")
        cluster.wait_workers(["w1"], timeout=10)
        status = cluster.wait_workflow(workflow_id, timeout=30)
        assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, (
            f"seed {SEED + 1} iteration {iteration}: {describe(status)}"
        )
    print(f"{mid_run} of {ITERATIONS} crashes hit a running workflow")
    assert mid_run >= ITERATIONS // 3, "too few crashes landed mid-run to test anything"

    rows = journal_check.read_sqlite(db(cluster))
    summary = journal_check.check_sqlite_journal(db(cluster))
    assert summary.workflows == ITERATIONS
    assert summary.of_type(wf.EVENT_TYPE_ACTION_FINISHED) == ITERATIONS * ACTIONS
    completed = journal_check.read_marks(marks)
    assert len({(w, a) for w, a, _ in completed}) == ITERATIONS * ACTIONS
    journal_check.check_completed_attempts_committed(summary, completed)
    no_lease_lost(rows)


# ----- (c) how long a restart takes, and how fast the journal replays ---------------------------


def measure_restarts(cluster: Cluster, samples: int = 2) -> float:
    """Best of ``samples`` SIGKILL -> SERVING restarts, in seconds."""
    return min(restart_coordinator(cluster) for _ in range(samples))


@pytest.mark.timeout(90)
def test_restart_to_serving_and_replay_speed(cluster: Cluster) -> None:
    """Prints restart-to-SERVING (empty and full journal) and replay events/s; asserts only
    that the state survives the restart and that it is not absurdly slow."""
    cluster.start_coordinator(**RESTART_PROFILE)
    empty_s = measure_restarts(cluster)
    cluster.add_worker("w1", slots=16, handlers=[HANDLERS], extra_args=["--no-exec"])
    spec = workflow("replay-load", [handler_action(f"n-{i}", "noop") for i in range(4000)])
    workflow_id = cluster.submit(spec)
    before = cluster.wait_workflow(workflow_id, timeout=60)
    assert before.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(before)
    events = len(journal_check.read_sqlite(db(cluster)))
    cluster.kill("w1", signal.SIGTERM)
    cluster.daemon("w1").wait(10)

    full_s = measure_restarts(cluster)
    replay_s = max(full_s - empty_s, 1e-3)
    print(
        f"restart to SERVING: empty journal {empty_s:.2f}s; {events} events {full_s:.2f}s;"
        f" replay ~{events / replay_s:,.0f} events/s"
    )
    for line in cluster.daemon("coordinator").log_tail().splitlines():
        if "replay" in line.lower():
            print("coordinator:", line)
    after = cluster.get(workflow_id)
    assert after.state == wf.WORKFLOW_STATE_SUCCEEDED
    assert len(after.actions) == 4000
    assert len(cluster.history(workflow_id)) == events
    assert full_s < 30, f"restart with {events} events took {full_s:.1f}s"


# ----- (d) a second coordinator on the same SQLite file waits as a standby ---------------------


@pytest.mark.timeout(60)
def test_second_coordinator_on_the_same_file_stands_by(cluster: Cluster, tmp_path: Path) -> None:
    """The file lock makes it a standby (NOT_SERVING, nothing written); when the leader dies
    the kernel drops the lock and the standby takes over, continuing the same journal."""
    cluster.start_coordinator(**RESTART_PROFILE)
    marks = tmp_path / "marks.txt"
    first = cluster.submit(workflow("before", [marked("a", marks, 0)]))
    cluster.add_worker("w1", slots=2)
    cluster.wait_workflow(first)
    address = f"127.0.0.1:{pg.free_port()}"
    argv = coordinator_argv(
        store=cluster.store,
        ready_file=tmp_path / "standby.ready.json",
        overrides={"--listen": address, "--metrics-listen": "off"},
    )
    standby = Daemon("standby", argv, daemon_env(), tmp_path / "standby.log")
    cluster.daemons["standby"] = standby
    standby.start()
    wait_for("the standby to answer", lambda: health(address) is not None, timeout=30)
    rows = journal_check.read_sqlite(db(cluster))
    # Not a sleep: the standby opens the lock file once a poll, and opens it again only after
    # losing, so six opens are five polls it lost (half a second: its polls are 0.1 s apart),
    # each a chance to have written.
    with LockTries(Path(f"{db(cluster)}.lock")) as tries:
        wait_for("the standby to lose 5 polls", lambda: tries.count() >= 6, timeout=30)
    assert health(address) == NOT_SERVING
    assert journal_check.read_sqlite(db(cluster)) == rows, "the standby wrote to the journal"

    cluster.kill("coordinator")
    started = time.monotonic()
    wait_for("the standby to take over", lambda: health(address) == SERVING, timeout=10)
    print(f"SQLite standby SERVING {time.monotonic() - started:.2f}s after the leader's SIGKILL")
    with plait.Client(address, timeout=10) as client:
        second = client.submit(workflow("after", [marked("b", marks, 0)])).workflow_id
        assert client.get(first).state == wf.WORKFLOW_STATE_SUCCEEDED
    summary = journal_check.check_sqlite_journal(db(cluster), require_finished=False)
    assert summary.workflows == 2
    assert summary.events > len(rows)
    assert second in {r.workflow_id for r in journal_check.read_sqlite(db(cluster))}
