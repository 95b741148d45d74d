"""The exec executor inside its sandbox, on real processes: hostile ``$PLAIT_OUTPUT`` files, the
start chain (run-as user, rlimits, cgroup barrier, deferred loader variables), and what is
killed when an attempt ends."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import Code
from plait.workerd.confinement import Sandbox
from plait.workerd.containment import CgroupTree, own_cgroup_dir, uid_processes
from plait.workerd.exec_executor import ExecExecutor
from plait.workerd.outputs import read_outputs
from plait.workerd.rlimits import Rlimits, can_raise_limits, find_prlimit
from plait.workerd.runas import UidPool, parse_run_as
from plait.workerd.sandbox import find_setpriv
from tests.unit.exec_support import FakeCtx, alive, exec_lease, run_lease, wait_dead, wait_file

SETPRIV = find_setpriv(os.defpath)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and util-linux setpriv"
)


def cgroup_base() -> str | None:
    base = own_cgroup_dir()
    return base if base is not None and os.access(base, os.W_OK) else None


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A tmp root run-as users can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="plait-unit-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tree() -> Iterator[CgroupTree]:
    base = cgroup_base()
    if base is None:
        pytest.skip("no writable cgroup v2 here")
    t = CgroupTree.create(base, f"plait-unit-exec-{os.getpid()}")
    yield t
    t.close()


def sandboxed(
    root: Path, *, pool: str | None = None, cgroups: CgroupTree | None = None
) -> ExecExecutor:
    run_as = parse_run_as(pool) if pool else None
    sandbox = Sandbox(
        rlimits=Rlimits.defaults(run_as=run_as is not None),
        pool=UidPool(run_as) if run_as else None,
        cgroups=cgroups,
        setpriv=SETPRIV,
        # As start-up decides: workerd sets another user's limits only with CAP_SYS_RESOURCE.
        prlimit=find_prlimit() if run_as and not can_raise_limits() else None,
    )
    return ExecExecutor(tmp_root=str(root), sandbox=sandbox)


# ----- $PLAIT_OUTPUT -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "words"),
    [
        ('mkfifo "$PLAIT_OUTPUT"', "$PLAIT_OUTPUT is a FIFO (named pipe), not a regular file"),
        ('ln -s /etc/hostname "$PLAIT_OUTPUT"', "$PLAIT_OUTPUT is a symbolic link"),
        ('ln -s /dev/zero "$PLAIT_OUTPUT"', "$PLAIT_OUTPUT is a symbolic link"),
        ('mkdir "$PLAIT_OUTPUT"', "$PLAIT_OUTPUT is a directory, not a regular file"),
    ],
)
async def test_hostile_outputs_fail_the_attempt(
    executor: ExecExecutor, script: str, words: str
) -> None:
    # Before: open() of the FIFO blocked the event loop for ever; the safety deadline is 20 s.
    r = await run_lease(executor, exec_lease(["/bin/sh", "-c", script]))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert r.error == words or r.error.startswith(words), r.error
    assert r.error_code == Code.INVALID_ARGUMENT


def test_read_outputs_refuses_devices_and_caps_what_it_reads(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        node = tmp_path / "zero"
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        assert read_outputs(str(node), 100) == (
            "",
            "$PLAIT_OUTPUT is a character device, not a regular file",
        )
    mine = tmp_path / "out.json"
    mine.write_text('{"a": 1}')
    assert read_outputs(str(mine), 100) == ('{"a":1}', "")
    # With a run-as user, the file must be that user's (not a hard link to someone else's).
    _, problem = read_outputs(str(mine), 100, owner=os.geteuid() + 1)
    assert "belongs to uid" in problem
    # Deep nesting would make json.loads recurse 100,000 times (RecursionError).
    mine.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert read_outputs(str(mine), 1 << 20) == ("", "$PLAIT_OUTPUT nests deeper than 64 levels")


async def test_the_loop_keeps_running_while_outputs_are_read(executor: ExecExecutor) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        r = await run_lease(
            executor,
            exec_lease(["/bin/sh", "-c", 'mkfifo "$PLAIT_OUTPUT"; exec sleep 0.3'], lease_id="f"),
        )
    finally:
        stop.set()
        await ticker
    assert "FIFO" in r.error
    assert ticks > 3


# ----- the start chain ---------------------------------------------------------------------------

STATUS = r"""
import json, os, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
limits = {l[:26].strip(): l[26:].split()[0] for l in open("/proc/self/limits")}
json.dump({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "nnp": status["NoNewPrivs"].strip(), "cgroup": open("/proc/self/cgroup").read(),
    "nofile": limits["Max open files"], "nproc": limits["Max processes"],
    "preload": os.environ.get("LD_PRELOAD"), "pwd": os.environ.get("PWD"),
    "home": os.environ["HOME"], "inputs": sys.stdin.read(),
    "dir": oct(os.stat(os.environ["HOME"]).st_mode & 0o777),
    "dir_owner": os.stat(os.environ["HOME"]).st_uid,
    "inputs_owner": os.stat(os.environ["PLAIT_INPUTS_FILE"]).st_uid,
}, open(os.environ["PLAIT_OUTPUT"], "w"))
"""


@needs_root
async def test_run_as_user_limits_and_cgroup(shared_root: Path, tree: CgroupTree) -> None:
    ex = sandboxed(shared_root, pool="62600-62601", cgroups=tree)
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    lease = exec_lease([python, "-c", STATUS], static_input={"k": "v"})
    lease.action.rlimits.open_files = 99
    try:
        r = await run_lease(ex, lease)
    finally:
        await ex.aclose()
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
    got = json.loads(r.outputs_json)
    assert got["uid"] == got["gid"] == got["dir_owner"] == got["inputs_owner"]
    assert got["uid"] in (62600, 62601)
    assert got["groups"] in ([], [got["gid"]])  # no supplementary groups
    assert got["nnp"] == "1"
    assert got["dir"] == "0o700"
    assert (got["nofile"], got["nproc"]) == ("99", "1024")
    assert f"/{os.path.basename(tree.path)}/a{os.getpid()}-" in got["cgroup"], got["cgroup"]
    assert json.loads(got["inputs"]) == {"input": {"k": "v"}, "needs": {}}  # no go line in it
    assert got["pwd"] is None and got["preload"] is None
    assert not [e for e in os.scandir(tree.path) if e.is_dir()]  # the attempt's cgroup is gone
    assert os.listdir(shared_root) == []


async def test_loader_variables_skip_the_start_steps(executor: ExecExecutor) -> None:
    # Every dynamically linked program that starts with a missing LD_PRELOAD complains once:
    # only the action itself may, not setpriv, prlimit or the barrier shell before it.
    lease = exec_lease(
        ["/bin/sh", "-c", "cat /dev/null"],
        env={"LD_PRELOAD": "/nonexistent/libplait-test.so", "LOCPATH": "/nonexistent"},
    )
    r = await run_lease(executor, lease)
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
    # The shell and its `cat` child: two complaints, both from the action's own processes.
    assert r.stderr_tail.count("libplait-test.so") == 2, r.stderr_tail


async def test_deferred_variables_reach_the_action_unchanged(executor: ExecExecutor) -> None:
    values = {"LD_LIBRARY_PATH": "/opt/lib:/x y", "MALLOC_ARENA_MAX": "2", "LANG": "C.UTF-8"}
    lease = exec_lease(["/usr/bin/env"] if os.path.exists("/usr/bin/env") else ["env"], env=values)
    r = await run_lease(executor, lease)
    seen = dict(line.split("=", 1) for line in r.stdout_tail.splitlines())
    assert {k: seen.get(k) for k in values} == values
    assert not any(k.startswith("PLAIT_SANDBOX_") for k in seen)
    assert "PWD" not in seen


# ----- what the end of an attempt kills ----------------------------------------------------------

ESCAPE = 'setsid -f /bin/sh -c \'echo $$ > "$0"; exec sleep 300\' "$HOME/escaped"; {tail}'


@needs_root
@pytest.mark.parametrize("containment", ["cgroup", "uid sweep"])
async def test_escaped_children_die_with_their_attempt(
    shared_root: Path, request: pytest.FixtureRequest, containment: str
) -> None:
    cgroups = request.getfixturevalue("tree") if containment == "cgroup" else None
    ex = sandboxed(shared_root, pool="62610-62611", cgroups=cgroups)
    assert ex.sandbox.containment == containment
    ctx = FakeCtx("l1")
    ex.start(exec_lease(["/bin/sh", "-c", ESCAPE.format(tail="sleep 300")], lease_id="l1"), ctx)
    try:
        pid_file = await wait_until_file(shared_root)
        escaped = int(await wait_file(pid_file))
        assert alive(escaped)
        ex.cancel("l1", "test cancels")
        await asyncio.wait_for(ctx.reported.wait(), 10)
        assert ctx.results[0].outcome == pb.ACTION_OUTCOME_CANCELLED
        assert not alive(escaped)  # dead before the result was reported
    finally:
        await ex.aclose()
    assert not uid_processes([62610, 62611])


@needs_root
async def test_a_shared_uid_sweep_spares_the_other_attempts(shared_root: Path) -> None:
    ex = sandboxed(shared_root, pool="62620")  # one uid for two attempts
    long = ex.start(
        exec_lease(["/bin/sh", "-c", "exec sleep 300"], lease_id="long"), FakeCtx("long")
    )
    try:
        for _ in range(500):
            if long.pgid:
                break
            await asyncio.sleep(0.01)
        r = await run_lease(
            ex, exec_lease(["/bin/sh", "-c", ESCAPE.format(tail="true")], lease_id="short")
        )
        assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
        groups = ex.sandbox.pool.live_groups(ex.sandbox.pool.run_as.identities[0])  # type: ignore[union-attr]
        assert len(groups) == 1
        (long_pgid,) = groups
        assert alive(long_pgid)  # the other attempt's group was spared
        left = [pid for pid, _, pgid in uid_processes([62620]) if pgid != long_pgid]
        assert left == []  # but the escaped child was not
    finally:
        await ex.aclose()
    assert await wait_dead(long_pgid)


async def wait_until_file(root: Path, name: str = "escaped", limit: float = 10.0) -> Path:
    for _ in range(int(limit / 0.02)):
        found = sorted(root.glob(f"plait-attempt-*/{name}"))
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no attempt wrote {name}")
