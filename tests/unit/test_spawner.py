"""The process spawner (plait.workerd.spawner) on real processes: what a spawned child gets before
its exec, how failures are reported, and that children die with the spawner and with workerd."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plait.v1 import worker_service_pb2 as pb
from plait.workerd import spawner as spawner_program
from plait.workerd.confinement import Sandbox
from plait.workerd.containment import uid_processes
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.spawn_client import START_LIMIT, ChildExit, Spawner, SpawnError
from tests.unit.exec_support import PY, FakeCtx, alive, exec_lease, run_lease, wait_dead

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    s = Spawner()
    assert await s.wait_ready(20)
    yield s
    s.close()


class Run:
    """One spawned child with its three pipes (workerd's ends)."""

    def __init__(
        self,
        spawner: Spawner,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | str = "/",
        limits: dict[int, int] | None = None,
        user: tuple[int, int] | None = None,
        no_new_privs: bool = False,
    ) -> None:
        stdin_r, stdin_w = os.pipe()
        self.out, out_w = os.pipe()
        self.err, err_w = os.pipe()
        try:
            self.child = spawner.spawn(
                argv=argv,
                env={"PATH": os.defpath, **(env or {})},
                cwd=str(cwd),
                stdio=(stdin_r, out_w, err_w),
                limits=limits or {},
                user=user,
                no_new_privs=no_new_privs,
            )
        finally:
            for fd in (stdin_r, out_w, err_w, stdin_w):
                os.close(fd)

    async def finish(self) -> tuple[ChildExit, str, str]:
        done = await asyncio.wait_for(self.child.exited, 20)
        out, err = self._read(self.out), self._read(self.err)
        return done, out, err

    @staticmethod
    def _read(fd: int) -> str:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        return b"".join(chunks).decode()


PROBE = textwrap.dedent(
    """
    import json, os
    limits = {l[:26].strip(): l[26:].split()[0] for l in open("/proc/self/limits")}
    print(json.dumps({
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "ppid": os.getppid(), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
        "nofile": limits["Max open files"], "core": limits["Max core file size"],
        "cwd": os.getcwd(), "env": dict(os.environ),
    }))
    """
)


async def test_a_child_gets_its_session_limits_and_nothing_else(
    spawner: Spawner, tmp_path: Path
) -> None:
    leak = os.open(os.devnull, os.O_RDONLY)  # inheritable in this process: must not reach it
    os.set_inheritable(leak, True)
    try:
        run = Run(
            spawner,
            [PY, "-c", PROBE],
            env={"X": "1", "LD_LIBRARY_PATH": "/nonexistent"},
            cwd=tmp_path,
            limits={7: 99, 4: 0},  # RLIMIT_NOFILE, RLIMIT_CORE
        )
        pid = await asyncio.wait_for(run.child.started, 20)
        done, out, err = await run.finish()
    finally:
        os.close(leak)
    assert done.returncode == 0 and done.error is None, (done, err)
    got = json.loads(out)
    assert got["pid"] == got["pgid"] == got["sid"] == pid  # its own session and group
    assert got["ppid"] == spawner.pid
    assert got["fds"] == [0, 1, 2, 3]  # 3: the listdir() above
    assert (got["nofile"], got["core"]) == ("99", "0")
    assert got["cwd"] == str(tmp_path)
    assert got["env"]["X"] == "1" and got["env"]["LD_LIBRARY_PATH"] == "/nonexistent"
    assert set(got["env"]) <= {"PATH", "X", "LD_LIBRARY_PATH", "LC_CTYPE"}  # nothing inherited


async def test_a_child_gets_default_signal_dispositions(spawner: Spawner) -> None:
    # Python ignores SIGPIPE and SIGXFSZ (the spawner SIGINT too); ignored stays ignored
    # across exec, so the child resets them. grep is no Python: it shows what it got.
    done, out, _ = await Run(
        spawner, ["/bin/grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]
    ).finish()
    assert done.returncode == 0
    blk, blocked, ign, ignored = out.split()
    assert (blk, blocked, ign) == ("SigBlk:", "0" * 16, "SigIgn:")
    # Bit N-1 is signal N. Only what Python (or the spawner) ignores is the spawner's to reset:
    # a signal this test process inherited as ignored stays so (the kernel keeps it across
    # exec; glibc's own signals 32 and 33 cannot be reset through sigaction), as with any
    # program a process starts.
    python_ignores = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT}
    assert not [s.name for s in python_ignores if int(ignored, 16) >> (s - 1) & 1], ignored


async def test_a_child_starts_with_no_signal_blocked_whatever_the_spawner_inherited() -> None:
    # A blocked signal survives fork and exec: a spawner started from a thread that blocks
    # SIGTERM (as glibc and CPython do around their own forks) must not pass that on.
    s = Spawner()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        s.start()  # the spawner process inherits this thread's mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        assert await s.wait_ready(20)
        done, out, _ = await Run(s, ["/bin/grep", "-E", "^SigBlk", "/proc/self/status"]).finish()
        assert done.returncode == 0
        assert out.split() == ["SigBlk:", "0" * 16]
    finally:
        s.close()


async def test_exec_failures_are_reported_with_their_errno(
    spawner: Spawner, tmp_path: Path
) -> None:
    missing, _, _ = await Run(spawner, [str(tmp_path / "nope")]).finish()
    assert missing.error == ("exec", errno.ENOENT) and missing.returncode == 127
    plain = tmp_path / "data.txt"
    plain.write_text("not a program\n")
    refused, _, _ = await Run(spawner, [str(plain)]).finish()
    assert refused.error == ("exec", errno.EACCES) and refused.returncode == 126
    script = tmp_path / "script"  # no "#!": the shell runs it, as execvp(3) does
    script.write_text('echo "ran $1"\n')
    script.chmod(0o755)
    ran, out, _ = await Run(spawner, [str(script), "arg"]).finish()
    assert (ran.returncode, ran.error, out) == (0, None, "ran arg\n")
    chdir, _, _ = await Run(spawner, ["/bin/true"], cwd=tmp_path / "gone").finish()
    assert chdir.error == ("chdir", errno.ENOENT) and chdir.returncode == 125


async def test_children_die_with_the_spawner_and_it_restarts(spawner: Spawner) -> None:
    run = Run(spawner, ["/bin/sleep", "300"])
    pid = await asyncio.wait_for(run.child.started, 20)
    first = spawner.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    with pytest.raises(SpawnError, match="spawner died"):
        await asyncio.wait_for(run.child.exited, 20)
    assert await wait_dead(pid), "the child outlived its spawner (PR_SET_PDEATHSIG)"
    for fd in (run.out, run.err):
        os.close(fd)
    again, out, _ = await Run(spawner, ["/bin/echo", "again"]).finish()
    assert (again.returncode, out) == (0, "again\n")
    assert spawner.pid not in (None, first)


HARNESS = """
import asyncio, os, sys
from plait.workerd.spawn_client import Spawner

async def main():
    s = Spawner()
    await s.wait_ready(20)
    r, w = os.pipe()
    child = s.spawn(argv=["/bin/sleep", "300"], env={}, cwd="/", stdio=(r, w, w), limits={})
    print(s.pid, await child.started, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_the_spawner_and_its_children_die_with_workerd() -> None:
    harness = subprocess.Popen([PY, "-c", HARNESS], stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout is not None
        spawner_pid, child = map(int, harness.stdout.readline().split())
        assert alive(spawner_pid) and alive(child)
        harness.send_signal(signal.SIGKILL)
        harness.wait(timeout=5)
        assert await wait_dead(spawner_pid), "the spawner outlived workerd"
        assert await wait_dead(child), "the attempt outlived workerd"
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        if harness.stdout is not None:
            harness.stdout.close()


async def test_a_spawner_that_cannot_start_leaves_attempts_to_the_exec_chain(
    tmp_path: Path,
) -> None:
    broken = Spawner(python="/bin/false")  # starts, and exits before it is ready
    ex = ExecExecutor(tmp_root=str(tmp_path), sandbox=Sandbox(spawner=broken))
    try:
        for i in range(START_LIMIT + 1):
            r = await run_lease(ex, exec_lease(["/bin/echo", "ok"], lease_id=f"l{i}"))
            assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
            assert r.stdout_tail == "ok\n"
        assert not broken.available
    finally:
        await ex.aclose()
        broken.close()
    assert os.listdir(tmp_path) == []


async def test_attempts_run_through_the_spawner(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path))
    try:
        lease = exec_lease(
            [PY, "-c", "import os, sys; print(os.getppid()); print(sys.stdin.read())"]
        )
        r = await run_lease(ex, lease)
        assert ex.spawner is not None
        assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
        ppid, inputs = r.stdout_tail.split("\n", 1)
        assert int(ppid) == ex.spawner.pid  # one fork and one exec: no start steps between
        assert json.loads(inputs) == json.loads(lease.inputs_json)
    finally:
        await ex.aclose()
    assert ex.spawner is not None and ex.spawner.pid is None  # the executor closed its own


@needs_root
async def test_run_as_children_and_sweeps(spawner: Spawner) -> None:
    run = Run(
        spawner,
        ["/bin/sh", "-c", "sleep 300 & echo $!; wait"],
        user=(62630, 62630),
        no_new_privs=True,
    )
    await asyncio.wait_for(run.child.started, 20)
    grandchild = int(await asyncio.to_thread(os.read, run.out, 100))
    assert [uid for pid, uid, _ in uid_processes([62630]) if pid == grandchild] == [62630]
    await spawner.sweep(62630, 62630)  # kill(-1) as the uid: every process of it
    done, _, _ = await run.finish()
    assert done.returncode == -signal.SIGKILL
    assert await wait_dead(grandchild)
    assert uid_processes([62630]) == []


def test_the_spawner_imports_only_a_few_standard_modules() -> None:
    # It forks once per attempt: every page it loaded is copied with each fork. Arguments that
    # make it exit at once (pid 1 is not its parent), after its imports.
    out = subprocess.run(
        [PY, "-I", "-S", "-X", "importtime", spawner_program.__file__, "1", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "marshal" in loaded and "ctypes" in loaded
    heavy = {"plait", "json", "re", "typing", "enum", "functools", "contextlib", "signal"}
    assert not loaded & heavy


async def test_an_attempt_whose_spawner_dies_fails_and_the_next_one_runs(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path))
    try:
        ctx = FakeCtx("long")
        attempt = ex.start(exec_lease(["/bin/sleep", "300"], lease_id="long"), ctx)
        for _ in range(1000):
            if attempt.pgid:
                break
            await asyncio.sleep(0.01)
        assert attempt.pgid and ex.spawner is not None and ex.spawner.pid is not None
        os.kill(ex.spawner.pid, signal.SIGKILL)
        await asyncio.wait_for(ctx.reported.wait(), 20)
        (r,) = ctx.results
        assert r.outcome == pb.ACTION_OUTCOME_FAILED
        assert "process spawner died" in r.error and r.exit_code == -signal.SIGKILL
        assert await wait_dead(attempt.pgid)
        again = await run_lease(ex, exec_lease(["/bin/true"], lease_id="next"))
        assert again.outcome == pb.ACTION_OUTCOME_SUCCEEDED, again
    finally:
        await ex.aclose()
    assert os.listdir(tmp_path) == []
