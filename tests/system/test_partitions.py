"""Partitions, a flapping link, a paused coordinator and a silent session (issue 11).

Real coordinator and workerd processes; a worker whose link is faulted reaches the coordinator
through :class:`tests.system.tcpproxy.TcpProxy`, everything else dials it directly.

* One-way partition: coordinator->worker bytes of worker ``a`` held for 9 s (its heartbeats
  still arrive), TTL 3 s, while ``a`` runs a long action and ``b`` waits idle. The action moves
  to ``b`` after at most one lease loss, is never handed back to ``a`` meanwhile, its first
  attempt is dead before the second starts, and ``a`` works normally once the link heals.
* Flapping link: both directions of two workers' links held 1 s of every 2 s for 30 s while a
  few hundred short actions run on them and on a third, direct worker: every action succeeds
  exactly once, nothing commits twice.
* Coordinator SIGSTOPped 3.5 s (TTL 3 s) while an action runs: at most one lease loss, and
  every LEASE_LOST carries a right typed reason (never "undelivered" for a lease whose start
  is journalled).
* Silent session: a raw Connect stream that sends Hello and then nothing is closed by the
  coordinator within about a TTL and leaves ListWorkers.

Each test prints what it measured (``-s`` shows it): fence latency, time to re-run, losses.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc
from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.system import invariants, journal_check
from tests.system.harness import (
    Cluster,
    describe,
    python_action,
    wait_for,
    workflow,
)
from tests.system.recovery import marked
from tests.system.tcpproxy import TcpProxy

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

TTL_S = 3.0
PROFILE = {"lease_ttl": "3s", "heartbeat_interval": "250ms", "kill_grace": "250ms"}
FLAP_PROFILE = {"lease_ttl": "800ms", "heartbeat_interval": "150ms", "kill_grace": "200ms"}
ONE_WAY_HOLD_S = 9.0
PAUSE_S = 3.5
# A lease loss the coordinator may record for an attempt that started and then lost its lease
# to a partition or a pause. UNDELIVERED (never reached the worker), NOT_REPORTED, REVOKED and
# HEDGE_ENDED are wrong for all of these scenarios; UNSPECIFIED is no reason at all.
PARTITION_LOSS_REASONS = frozenset(
    {
        wf.EVENT_REASON_LEASE_EXPIRED,
        wf.EVENT_REASON_WORKER_LEFT,
        wf.EVENT_REASON_NOT_READOPTED,
        wf.EVENT_REASON_SELF_FENCED,
        # A queued lease handed back unstarted for a worker with a free slot (prefetch).
        wf.EVENT_REASON_RECLAIMED,
        # A grant in flight as the stream broke, never started: the same worker process came
        # back without it (checked below: never one whose ACTION_STARTED is journalled).
        wf.EVENT_REASON_UNDELIVERED,
    }
)

# Every attempt checks in (an atomically renamed JSON file): its pid, fencing token, its
# CLOCK_MONOTONIC reading (the same clock as the test's time.monotonic), whether it is the
# first attempt of all and, if not, whether the first attempt's process was still alive when
# it started -- the overlap of two copies that fencing must prevent. The first attempt then
# runs for `first_s`, every later one for `later_s`.
CHECK_IN = """
import time
marks = {marks!r}
first_path = os.path.join(marks, "first")
try:
    fd = os.open(first_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    first = False
    with open(first_path) as f:
        first_pid = int(f.read() or 0)
else:
    first, first_pid = True, os.getpid()
    os.write(fd, str(first_pid).encode())
    os.close(fd)

def alive(pid):
    try:
        with open(f"/proc/{{pid}}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")

token = os.environ.get("PLAIT_FENCING_TOKEN", "")
record = {{
    "pid": os.getpid(),
    "token": int(token or 0),
    "first": first,
    "first_alive": (not first) and alive(first_pid),
    "t": time.monotonic(),
}}
tmp = os.path.join(marks, f".attempt-{{os.getpid()}}")
with open(tmp, "w") as f:
    json.dump(record, f)
os.rename(tmp, os.path.join(marks, f"attempt-{{os.getpid()}}.json"))
time.sleep({first_s} if first else {later_s})
plait_output({{"token": token, "first": first}})
"""


def check_in_action(action_id: str, marks: Path, first_s: float, later_s: float) -> wf.ActionSpec:
    marks.mkdir()
    code = CHECK_IN.format(marks=str(marks), first_s=first_s, later_s=later_s)
    return python_action(action_id, code)


def attempts(marks: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(marks.glob("attempt-*.json"))]


def first_attempt(marks: Path) -> dict[str, Any]:
    return wait_for(
        "the first attempt to check in",
        lambda: next((a for a in attempts(marks) if a["first"]), None),
        timeout=30,
    )


def later_attempt(marks: Path, timeout: float) -> dict[str, Any]:
    return wait_for(
        "a second attempt to check in",
        lambda: next((a for a in attempts(marks) if not a["first"]), None),
        timeout=timeout,
    )


def started(cluster: Cluster, workflow_id: str, action_id: str) -> wf.HistoryEvent:
    """Waits until the action's start is journalled (so its lease's loss must not be
    recorded as undelivered)."""
    return cluster.wait_event(
        workflow_id,
        lambda e: e.type == wf.EVENT_TYPE_ACTION_STARTED and e.action_id == action_id,
        f"{action_id} to start",
        timeout=30,
    )


def check_loss_reasons(events: list[wf.HistoryEvent]) -> None:
    """Every LEASE_LOST has a typed reason that fits a partition or pause, and none of a lease
    whose ACTION_STARTED is journalled says the lease was never delivered."""
    started_leases = {
        e.lease_id for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_STARTED) if e.lease_id
    }
    for e in invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST):
        name = wf.EventReason.Name(e.reason)
        assert e.reason in PARTITION_LOSS_REASONS, f"{invariants.show(e)}: reason {name}"
        assert not (e.lease_id in started_leases and e.reason == wf.EVENT_REASON_RECLAIMED), (
            f"{invariants.show(e)}: handed back as never started, but its ACTION_STARTED is"
            " journalled"
        )
        assert not (e.lease_id in started_leases and e.reason == wf.EVENT_REASON_UNDELIVERED), (
            f"{invariants.show(e)}: UNDELIVERED although its ACTION_STARTED is journalled"
        )


def worker_of_token(events: list[wf.HistoryEvent], action_id: str) -> dict[int, str]:
    return {
        e.fencing_token: e.worker_id
        for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, action_id)
    }


def proxied_worker(cluster: Cluster, proxies: list[TcpProxy], name: str, **kwargs: Any) -> TcpProxy:
    """Starts a workerd that reaches the coordinator through a proxy of its own."""
    proxy = TcpProxy(cluster.grpc_target).start()
    proxies.append(proxy)
    # workerd's --coordinator is a plain option: the last one given wins.
    cluster.add_worker(name, extra_args=["--coordinator", proxy.address], **kwargs)
    return proxy


# ----- a: one-way partition ------------------------------------------------------------------


@pytest.mark.slow
def test_one_way_partition_moves_the_action_to_the_healthy_worker(
    cluster: Cluster, proxies: list[TcpProxy], tmp_path: Path
) -> None:
    cluster.start_coordinator(**PROFILE)
    proxy = proxied_worker(cluster, proxies, "a", slots=1, labels={"host": "a"})
    marks = tmp_path / "marks"
    spec = workflow("one-way", [check_in_action("work", marks, first_s=60, later_s=0.5)])
    workflow_id = cluster.submit(spec)
    first = first_attempt(marks)
    started(cluster, workflow_id, "work")
    # Only now is the healthy worker there: the first lease was a's for sure.
    cluster.add_worker("b", slots=1, labels={"host": "b"})

    proxy.hold("to_client")
    held_at = time.monotonic()
    try:
        fence_s = (
            wait_for(
                "a's attempt to be killed (self-fencing)",
                lambda: None if procs.is_alive(first["pid"]) else time.monotonic(),
                timeout=ONE_WAY_HOLD_S,
                interval=0.02,
            )
            - held_at
        )
        second = later_attempt(marks, timeout=ONE_WAY_HOLD_S + 20)
        rerun_s = second["t"] - held_at
        status = cluster.wait_workflow(workflow_id, timeout=30)
        # The partition lasts its full length whatever finished meanwhile: a's fresh Hellos
        # and heartbeats keep arriving, and must earn it nothing while it cannot hear.
        time.sleep(max(0.0, ONE_WAY_HOLD_S - (time.monotonic() - held_at)))
    finally:
        proxy.release("to_client")
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "work")
    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "work")
    timings = (
        f"fence {fence_s:.2f}s after the hold, re-run on b {rerun_s:.2f}s after it;"
        f" leases {[(e.worker_id, e.fencing_token) for e in leases]}, losses"
        f" {[wf.EventReason.Name(e.reason) for e in lost]}"
    )
    print(f"one-way partition: {timings}")
    assert len(lost) <= 1, timings
    # b was connected and idle throughout: after a lost the lease, it was b's to take.
    assert [e.worker_id for e in leases] == ["a", "b"], timings
    assert worker_of_token(events, "work")[second["token"]] == "b", (second, timings)
    assert not second["first_alive"], f"both copies ran at once: {second}; {timings}"
    check_loss_reasons(events)
    (finished,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "work")
    assert (finished.worker_id, finished.fencing_token) == ("b", leases[-1].fencing_token)
    journal_check.check_sqlite_journal(cluster.tmp / "plait.db")

    # Healed: a takes and finishes work of its own again.
    pinned = python_action("on-a", "plait_output({'ok': True})", selector={"host": "a"})
    again = cluster.submit(workflow("after-heal", [pinned]))
    healed = cluster.wait_workflow(again, timeout=60)
    assert healed.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(healed)
    assert healed.actions[0].worker_id == "a"
    assert "a" in cluster.connected_workers()


# ----- b: flapping link ----------------------------------------------------------------------

CHAINS = 60
STEPS = 5
STEP_SLEEP_S = 0.8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flapping_link_commits_every_action_exactly_once(
    cluster: Cluster, proxies: list[TcpProxy], tmp_path: Path
) -> None:
    # A lease TTL shorter than each 1 s hold: every hold makes the flapping workers self-fence
    # and lose what they run, so fencing, re-leasing and hold-back are all exercised.
    cluster.start_coordinator(**FLAP_PROFILE)
    flappy = [proxied_worker(cluster, proxies, name, slots=4) for name in ("f1", "f2")]
    cluster.add_worker("steady", slots=4)
    marks = tmp_path / "marks"
    actions = [
        marked(
            f"c{c:02d}-s{s}",
            marks,
            STEP_SLEEP_S,
            needs=[f"c{c:02d}-s{s - 1}"] if s else [],
        )
        for c in range(CHAINS)
        for s in range(STEPS)
    ]
    spec = workflow("flapping", actions)

    flaps = [p.flap(period=2.0, down=1.0, duration=30.0) for p in flappy]
    began = time.monotonic()
    workflow_id = cluster.submit(spec)
    try:
        status = cluster.wait_workflow(workflow_id, timeout=180)
        took_s = time.monotonic() - began
        reports = [f.result(60) for f in flaps]
    finally:
        for p in flappy:
            p.stop_flap()
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    assert all(a.state == wf.ACTION_STATE_SUCCEEDED for a in status.actions)
    assert len(status.actions) == CHAINS * STEPS

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)  # one ACTION_FINISHED each, fencing, order
    summary = journal_check.check_sqlite_journal(cluster.tmp / "plait.db")
    succeeded = [
        e
        for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)
        if e.action_state == wf.ACTION_STATE_SUCCEEDED
    ]
    assert sorted(e.action_id for e in succeeded) == sorted(a.id for a in spec.actions)
    assert len(summary.committed) == CHAINS * STEPS

    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST)
    by_worker: dict[str, int] = {}
    for e in succeeded:
        by_worker[e.worker_id] = by_worker.get(e.worker_id, 0) + 1
    completed = journal_check.read_marks(marks)
    ran_twice = len(completed) - len({(w, a) for w, a, _ in completed})
    reasons: dict[str, int] = {}
    for e in lost:
        name = wf.EventReason.Name(e.reason)
        reasons[name] = reasons.get(name, 0) + 1
    print(
        f"flapping link: {len(spec.actions)} actions in {took_s:.1f}s; flaps"
        f" {[(r.cycles, round(r.held_s, 1)) for r in reports]} (cycles, s held);"
        f" commits by worker {by_worker}; lease losses {len(lost)} {reasons};"
        f" attempts completed {len(completed)} ({ran_twice} more than once);"
        f" stale results refused"
        f" {len(invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED))}"
    )
    # The flapping workers took part (their links flapped while they held work).
    assert by_worker.get("f1", 0) + by_worker.get("f2", 0) > 0, by_worker
    check_loss_reasons(events)


# ----- c: coordinator paused ----------------------------------------------------------------


def test_paused_coordinator_costs_at_most_one_lease_loss(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator(**PROFILE)
    cluster.add_worker("w1", slots=1, wait=False)
    cluster.add_worker("w2", slots=1, wait=False)
    cluster.wait_workers(["w1", "w2"])
    marks = tmp_path / "marks"
    spec = workflow("pause", [check_in_action("work", marks, first_s=30, later_s=0.5)])
    workflow_id = cluster.submit(spec)
    first = first_attempt(marks)
    started(cluster, workflow_id, "work")

    cluster.stop("coordinator")
    stopped_at = time.monotonic()
    killed_at: float | None = None
    try:
        # The pause's length is the scenario; meanwhile, watch the worker fence itself.
        while (left := PAUSE_S - (time.monotonic() - stopped_at)) > 0:
            if killed_at is None and not procs.is_alive(first["pid"]):
                killed_at = time.monotonic()
            time.sleep(min(0.02, left))
    finally:
        cluster.cont("coordinator")
    resumed_at = time.monotonic()

    status = cluster.wait_workflow(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    journal_check.check_sqlite_journal(cluster.tmp / "plait.db")
    lost = invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "work")
    later = [a for a in attempts(marks) if not a["first"]]
    fence = f"{killed_at - stopped_at:.2f}s" if killed_at is not None else "not within the pause"
    timings = (
        f"first attempt killed {fence} after SIGSTOP;"
        f" re-run {[round(a['t'] - resumed_at, 2) for a in later]}s after SIGCONT;"
        f" losses {[(e.worker_id, e.fencing_token, wf.EventReason.Name(e.reason)) for e in lost]}"
        f" {[e.message for e in lost]}"
    )
    print(f"paused coordinator: {timings}")
    assert len(lost) <= 1, timings
    check_loss_reasons(events)
    assert all(not a["first_alive"] for a in later), f"both copies ran at once: {timings}"


# ----- d: silent session ---------------------------------------------------------------------


@dataclass
class SilentStream:
    """A Connect stream that says Hello and then nothing, read on a thread of its own."""

    cluster: Cluster
    worker_id: str

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.cluster.grpc_target)
        self.quiet = threading.Event()
        self.ended = threading.Event()
        self.received: list[wpb.ConnectResponse] = []
        self.got_first = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.ended_at = 0.0
        self.call: Any = None
        self.reader = threading.Thread(target=self._read, name="silent-stream", daemon=True)

    def _requests(self) -> Iterator[wpb.ConnectRequest]:
        yield wpb.ConnectRequest(
            hello=wpb.Hello(worker_id=self.worker_id, slots=1, handlers=["noop"])
        )
        self.quiet.wait()  # then nothing, until the test is done

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.received.append(msg)
                self.got_first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code = err.code()  # type: ignore[attr-defined]
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()
            self.got_first.set()

    def open(self) -> None:
        self.call = wgrpc.WorkerServiceStub(self.channel).Connect(self._requests())
        self.reader.start()

    def close(self) -> None:
        self.quiet.set()
        if self.call is not None:
            self.call.cancel()
        if self.reader.is_alive():
            self.reader.join(10)
        self.channel.close()


def test_silent_session_is_closed_after_a_ttl(cluster: Cluster) -> None:
    cluster.start_coordinator(lease_ttl="2s", heartbeat_interval="250ms")
    ttl_s = 2.0
    stream = SilentStream(cluster, "silent")
    try:
        stream.open()
        assert stream.got_first.wait(30), "no Welcome"
        welcomed_at = time.monotonic()
        assert stream.received and stream.received[0].HasField("welcome"), stream.received
        assert "silent" in cluster.connected_workers()
        # Generous on a loaded machine: the coordinator checks sessions on its own cadence.
        bound_s = 2 * ttl_s + 2.0
        assert stream.ended.wait(bound_s + 30), "the coordinator never closed the silent stream"
        closed_s = stream.ended_at - welcomed_at
        gone = wait_for(
            "the silent worker to leave ListWorkers",
            lambda: time.monotonic() if "silent" not in cluster.connected_workers() else None,
            timeout=bound_s + 30,
        )
        gone_s = gone - welcomed_at
        print(
            f"silent session (TTL {ttl_s:g}s): stream closed {closed_s:.2f}s after Welcome"
            f" ({stream.code}), gone from ListWorkers {gone_s:.2f}s after it"
        )
        assert closed_s <= bound_s, f"closed {closed_s:.2f}s after Welcome (bound {bound_s}s)"
        assert gone_s <= bound_s + 1.0, f"listed {gone_s:.2f}s after Welcome"
    finally:
        stream.close()
    assert cluster.daemon("coordinator").running()
