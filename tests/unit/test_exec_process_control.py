"""The exec executor controlling real processes: cancel, kill after grace, run timeout, process
groups, aclose, throughput, and the keeper that kills attempts when workerd dies (no zombies)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import AttemptResult
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.keeper import Keeper, keep
from tests.unit.exec_support import (
    PY,
    FakeCtx,
    alive,
    exec_lease,
    run_lease,
    wait_dead,
    wait_file,
)


async def test_cancel_terms_the_group(executor: ExecExecutor, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    lease = exec_lease(["/bin/sh", "-c", f"echo $$ > {ready}; exec sleep 30"])
    ctx = FakeCtx(lease.lease_id, kill_grace=5.0)
    started = time.monotonic()
    executor.start(lease, ctx)
    await wait_file(ready)
    executor.cancel(lease.lease_id, "user asked")
    await asyncio.wait_for(ctx.reported.wait(), 10)
    r = ctx.results[0]
    assert r.outcome == pb.ACTION_OUTCOME_CANCELLED
    assert r.exit_code == -signal.SIGTERM
    assert r.error == "user asked"
    assert time.monotonic() - started < 4.0  # TERM was enough; no wait for the grace


async def test_cancel_kills_after_grace_when_term_is_ignored(
    executor: ExecExecutor, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 60 & echo $! > {pids}; echo $$ > {ready}; wait; wait; wait"
    lease = exec_lease(["/bin/sh", "-c", script])
    ctx = FakeCtx(lease.lease_id, kill_grace=0.5)
    executor.start(lease, ctx)
    await wait_file(ready)
    child = int(await wait_file(pids))
    t0 = time.monotonic()
    executor.cancel(lease.lease_id, "superseded")
    await asyncio.wait_for(ctx.reported.wait(), 10)
    elapsed = time.monotonic() - t0
    r = ctx.results[0]
    assert r.outcome == pb.ACTION_OUTCOME_CANCELLED
    assert r.exit_code == -signal.SIGKILL
    assert 0.45 <= elapsed < 3.0
    assert await wait_dead(child)


async def test_run_timeout_times_out(executor: ExecExecutor) -> None:
    t0 = time.monotonic()
    r = await run_lease(executor, exec_lease(["sleep", "30"], timeout=0.3))
    assert r.outcome == pb.ACTION_OUTCOME_TIMED_OUT
    assert "run timeout 300ms exceeded" in r.error
    assert time.monotonic() - t0 < 5


async def test_leftovers_in_the_group_die_with_the_attempt(
    executor: ExecExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg"
    r = await run_lease(
        executor, exec_lease(["/bin/sh", "-c", f"sleep 300 > /dev/null 2>&1 & echo $! > {pidfile}"])
    )
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED
    assert await wait_dead(int(pidfile.read_text()))


async def test_aclose_kills_running_attempts(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path))
    ctx = FakeCtx("l", kill_grace=0.2)
    ex.start(exec_lease(["sleep", "30"], lease_id="l"), ctx)
    await asyncio.sleep(0.2)
    await ex.aclose()
    assert ctx.results[0].outcome == pb.ACTION_OUTCOME_CANCELLED
    assert ex.running == []


async def test_many_true_actions_are_fast(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path))
    n, width = 300, 4
    sem = asyncio.Semaphore(width)

    async def one(i: int) -> AttemptResult:
        async with sem:
            return await run_lease(ex, exec_lease(["/bin/true"], lease_id=f"l{i}"))

    t0 = time.monotonic()
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await ex.aclose()
    rate = n / (time.monotonic() - t0)
    print(f"exec /bin/true: {rate:.0f} actions/s")
    assert all(r.outcome == pb.ACTION_OUTCOME_SUCCEEDED for r in results)
    # Lenient: CI boxes are shared; `make bench`-style numbers are in docs/workerd.md.
    assert rate > 40
    assert os.listdir(tmp_path) == []


def test_keeper_kills_registered_groups_on_eof() -> None:
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spared = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        keep(
            [f"+{victim.pid}\n".encode(), f"+{spared.pid}\n".encode(), f"-{spared.pid}\n".encode()]
        )
        assert victim.wait(timeout=5) == -signal.SIGKILL
        assert spared.poll() is None
    finally:
        for p in (victim, spared):
            p.kill()
            p.wait()


HARNESS = """
import asyncio, sys
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.keeper import Keeper
from plait.v1 import worker_service_pb2 as pb, workflow_pb2

class Ctx:
    lease_id = "l"
    kill_grace = 1.0
    def report(self, result):
        pass

async def main():
    keeper = Keeper()
    keeper.start()
    print(keeper.pid, flush=True)
    ex = ExecExecutor(keeper=keeper)
    spec = workflow_pb2.ActionSpec(
        id="a", exec=workflow_pb2.ExecAction(argv=["/bin/sh", "-c", sys.argv[1]]))
    ex.start(pb.Lease(lease_id="l", action=spec), Ctx())
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_grandchildren_die_when_workerd_is_sigkilled(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The shell (a direct child, PDEATHSIG) starts a grandchild that only the keeper can kill;
    # setsid would escape both, so the grandchild stays in the attempt's group as actions do.
    script = f"sleep 300 & echo $$ $! > {pids}; wait"
    harness = subprocess.Popen([PY, "-c", HARNESS, script], stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout is not None
        keeper_pid = int(harness.stdout.readline())
        shell_pid, grandchild = map(int, (await wait_file(pids)).split())
        assert alive(shell_pid) and alive(grandchild) and alive(keeper_pid)
        harness.send_signal(signal.SIGKILL)
        harness.wait(timeout=5)
        assert await wait_dead(shell_pid), "the direct child outlived workerd"
        assert await wait_dead(grandchild), "the grandchild outlived workerd"
        assert await wait_dead(keeper_pid), "the keeper did not exit"
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        if harness.stdout is not None:
            harness.stdout.close()
        for pid in (locals().get("shell_pid"), locals().get("grandchild")):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_keeper_client_restarts_a_dead_keeper() -> None:
    keeper = Keeper()
    keeper.start()
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        first = keeper.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        time.sleep(0.1)
        keeper.register(victim.pid)  # notices the dead keeper and starts a new one
        keeper.register(victim.pid)
        assert keeper.pid not in (None, first)
        keeper.close()  # EOF: the new keeper kills the registered group
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        keeper.close()
        victim.kill()
        victim.wait()
