"""The keeper's fence: attempts die by the fence deadline even while workerd cannot act.

The keeper runs as the real program (``python -m plait.workerd.keeper``) with real child
processes in their own process groups; the last test runs a real session, exec executor and
keeper against the integration tier's in-test coordinator and stalls the session's event loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.v1 import worker_service_pb2 as pb
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.keeper import Keeper, KeeperState
from tests.integration.worker_session_support import (
    HEARTBEAT,
    TTL,
    Harness,
    connected,
    exec_lease,
    wait_pid_file,
)
from tests.unit.exec_support import alive

# How late past its deadline the keeper may kill (I9 allows kill grace + 1 s after the lease
# is lost; the keeper itself wakes within milliseconds, the rest is for a loaded machine).
PROMPT_S = 1.0


class KeeperProc:
    """The keeper program with a pipe on its stdin, as workerd starts it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plait.workerd.keeper"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def send(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    def close(self) -> int:
        """EOF on its stdin (workerd died); returns the keeper's exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)


class Victim:
    """An attempt: a shell in its own process group with a grandchild in the same group."""

    def __init__(self, tmp: Path, name: str) -> None:
        pids = tmp / f"{name}.pids"
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f"sleep 300 & echo $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"],
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        deadline = time.monotonic() + 10
        while not pids.exists():
            assert time.monotonic() < deadline, "the victim never started its grandchild"
            time.sleep(0.005)
        self.grandchild = int(pids.read_text())

    def alive(self) -> bool:
        return self.proc.poll() is None or alive(self.grandchild)

    def wait_dead(self, limit: float = 10.0) -> float:
        """Monotonic time both processes were first seen dead."""
        deadline = time.monotonic() + limit
        while self.proc.poll() is None or alive(self.grandchild):
            assert time.monotonic() < deadline, f"group {self.pgid} still alive after {limit}s"
            time.sleep(0.002)
        return time.monotonic()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def keeper() -> Iterator[KeeperProc]:
    k = KeeperProc()
    try:
        yield k
    finally:
        if k.proc.poll() is None:
            k.proc.kill()
            k.proc.wait()
        if k.proc.stdin is not None:
            k.proc.stdin.close()


@pytest.fixture
def victims() -> Iterator[list[Victim]]:
    made: list[Victim] = []
    yield made
    for v in made:
        v.kill()


def spawn(victims: list[Victim], tmp: Path) -> Victim:
    v = Victim(tmp, f"v{len(victims)}")
    victims.append(v)
    return v


# ----- the keeper program -------------------------------------------------------------------


def test_the_fence_kills_every_registered_group_when_its_deadline_passes(
    keeper: KeeperProc, victims: list[Victim], tmp_path: Path
) -> None:
    a, b, spared = (spawn(victims, tmp_path) for _ in range(3))
    deadline = time.monotonic() + 0.5
    keeper.send(f"+{a.pgid}", f"+{b.pgid}", f"+{spared.pgid}", f"-{spared.pgid}")
    keeper.send(f"+f {deadline!r}")
    died = max(a.wait_dead(), b.wait_dead())
    print(f"fence: groups dead {1000 * (died - deadline):.1f} ms after the deadline")
    assert deadline <= died <= deadline + PROMPT_S
    assert spared.alive(), "an unregistered group was killed"
    assert keeper.proc.poll() is None, "the keeper exits only on EOF"
    assert a.proc.returncode == -signal.SIGKILL


def test_a_refreshed_deadline_keeps_attempts_alive(
    keeper: KeeperProc, victims: list[Victim], tmp_path: Path
) -> None:
    v = spawn(victims, tmp_path)
    keeper.send(f"+{v.pgid}")
    # Like workerd on every acked heartbeat: the deadline stays 1 s ahead for 2 s.
    start = time.monotonic()
    last = start
    while time.monotonic() < start + 2.0:
        last = time.monotonic() + 1.0
        keeper.send(f"+f {last!r}")
        time.sleep(0.1)
    assert v.alive(), "killed although its deadline kept moving"
    died = v.wait_dead()  # no more refreshes: the last deadline holds
    assert last <= died <= last + PROMPT_S


@pytest.mark.parametrize("disarm", ["-f", "+f inf"])
def test_a_disarmed_fence_kills_nothing(
    keeper: KeeperProc, victims: list[Victim], tmp_path: Path, disarm: str
) -> None:
    v = spawn(victims, tmp_path)
    deadline = time.monotonic() + 0.3
    keeper.send(f"+{v.pgid}", f"+f {deadline!r}", disarm)
    # A property of nothing happening: give the keeper its deadline and half a second more.
    time.sleep(max(0.0, deadline + 0.5 - time.monotonic()))
    assert v.alive(), f"killed after {disarm!r}"
    assert keeper.close() == 0  # EOF still kills what is registered
    v.wait_dead(limit=5)


def test_after_firing_the_fence_stays_disarmed_until_a_new_deadline(
    keeper: KeeperProc, victims: list[Victim], tmp_path: Path
) -> None:
    first = spawn(victims, tmp_path)
    deadline = time.monotonic() + 0.2
    keeper.send(f"+{first.pgid}", f"+f {deadline!r}")
    first.wait_dead()
    # Registrations stay (workerd unregisters once it has reaped); a new attempt registered
    # after the fence fired is not killed by the old deadline...
    later = spawn(victims, tmp_path)
    keeper.send(f"+{later.pgid}")
    time.sleep(0.5)
    assert later.alive(), "a fired fence killed an attempt registered after it"
    # ... but by the next one.
    new = time.monotonic() + 0.2
    keeper.send(f"+f {new!r}")
    died = later.wait_dead()
    assert new <= died <= new + PROMPT_S
    assert keeper.proc.poll() is None


def test_eof_still_cleans_up_with_a_fence_armed(
    keeper: KeeperProc, victims: list[Victim], tmp_path: Path
) -> None:
    v = spawn(victims, tmp_path)
    keeper.send(f"+{v.pgid}", f"+f {time.monotonic() + 3600!r}")
    closed = time.monotonic()
    assert keeper.close() == 0
    assert v.wait_dead(limit=5) <= closed + PROMPT_S


def test_malformed_fence_lines_are_ignored_or_disarm() -> None:
    state = KeeperState()
    for line in [b"+f", b"+f \n", b"f 12", b"+g 12", b"+ff 1"]:
        state.apply(line)
    assert state.deadline is None and not state.attempts
    state.apply(b"+f 12.5\n")
    assert state.deadline == 12.5
    assert not state.fence_due(12.49) and state.fence_due(12.5)
    state.apply(b"+f nan")
    assert state.deadline is None
    state.apply(b"+f 1e400")  # inf
    assert state.deadline is None


# ----- workerd's end: Keeper.fence ----------------------------------------------------------


def test_keeper_client_coalesces_the_fence_and_resends_it_to_a_new_keeper(
    victims: list[Victim], tmp_path: Path
) -> None:
    keeper = Keeper()
    keeper.start()
    writes: list[bytes] = []
    real_write = keeper._write

    def recording(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    keeper._write = recording  # type: ignore[method-assign]
    try:
        far = time.monotonic() + 3600
        keeper.fence(far)
        assert writes == [], "a fence with no attempt registered is not sent"
        a = spawn(victims, tmp_path)
        keeper.register(a.pgid)
        assert writes == [f"+f {far!r}\n+{a.pgid}\n".encode()]
        keeper.fence(far)
        keeper.register_dir(str(tmp_path / "d"))
        assert writes[1:] == [f"+d {tmp_path / 'd'}\n".encode()], "an unchanged fence is resent"
        keeper.fence(math.inf)
        assert writes[-1] == b"-f\n"

        # The keeper dies; the next write starts a new one, which gets everything again.
        first = keeper.pid
        assert first is not None
        deadline = time.monotonic() + 1.0
        keeper.fence(deadline)
        os.kill(first, signal.SIGKILL)
        while alive(first):
            time.sleep(0.005)
        b = spawn(victims, tmp_path)
        keeper.register(b.pgid)
        assert keeper.pid not in (None, first)
        resent = b"".join(writes[-2:])
        assert f"+f {deadline!r}\n".encode() in resent and f"+{a.pgid}\n".encode() in resent
        died = max(a.wait_dead(), b.wait_dead())
        assert deadline <= died <= deadline + PROMPT_S
    finally:
        keeper.close()


# ----- the whole chain: session -> exec executor -> keeper ----------------------------------


async def test_a_stalled_session_is_fenced_by_the_keeper(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.start_server()
    try:
        session = h.start_session()
        stream = await connected(h)
        pidfile = tmp_path / "pid"
        stream.grant(exec_lease(["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], "x1"))
        pid = await wait_pid_file(pidfile)
        executor = h.executors[1]
        assert isinstance(executor, ExecExecutor)
        # A session that runs keeps its attempt alive across several TTLs: every ack moves the
        # keeper's deadline (send time + TTL - one heartbeat) forward.
        seen = len(stream.acked_heartbeats)
        await h.coord.wait_for(
            lambda: len(stream.acked_heartbeats) >= seen + 2 * TTL / HEARTBEAT, limit=30
        )
        assert alive(pid), "the keeper killed an attempt of a session that runs"
        fenced_at = executor.fenced_at
        assert fenced_at <= stream.acked_heartbeats[-1][1] + TTL - HEARTBEAT
        assert fenced_at > time.monotonic(), "the fence is not ahead of a running session"

        # The event loop stalls (as it would under SIGSTOP): neither the session's self-fence
        # nor its executor can act; only the keeper can.
        died = None
        while time.monotonic() < fenced_at + 5.0:
            if not alive(pid):
                died = time.monotonic()
                break
            time.sleep(0.002)  # noqa: ASYNC251 - blocks the loop on purpose
        assert died is not None, "the attempt outlived its fence while the session stalled"
        print(f"stalled session: attempt dead {1000 * (died - fenced_at):.1f} ms after the fence")
        assert fenced_at <= died <= fenced_at + PROMPT_S

        # Running again, the session reports the attempt as killed, not as failed.
        result = await h.coord.wait_for(
            lambda: next(
                (r for s in h.coord.streams for r in s.results if r.lease_id == "x1"), None
            ),
            limit=15,
        )
        assert result.outcome == pb.ACTION_OUTCOME_CANCELLED, result
        assert result.exit_code == -signal.SIGKILL
        # Killed while the loop stalled: by the keeper, whichever way the session saw it first.
        assert any(why in result.error.message for why in ("by the keeper", "self-fenced"))
        print(f"reported as: {result.error.message}")
        assert session.running == []
    finally:
        await h.close()
