"""Containment on real processes: cgroups, uid sweeps, the tmp root, removing attempt dirs, and
the keeper cleaning all of them up when workerd dies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.workerd.containment import (
    CgroupTree,
    cgroup_members,
    join_cgroup,
    own_cgroup_dir,
    remove_cgroup,
    sweep_uid,
    uid_processes,
)
from plait.workerd.keeper import keep
from plait.workerd.runas import Identity
from plait.workerd.sandbox import find_setpriv
from plait.workerd.tmproot import prepare_tmp_root
from tests.unit.exec_support import alive

ROOT = Path(__file__).resolve().parents[2]
SETPRIV = find_setpriv(os.defpath)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and util-linux setpriv"
)


def cgroup_base() -> str | None:
    base = own_cgroup_dir()
    return base if base is not None and os.access(base, os.W_OK) else None


needs_cgroups = pytest.mark.skipif(cgroup_base() is None, reason="no writable cgroup v2 here")


def wait_until(what: str, probe: object, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


# ----- cgroups -----------------------------------------------------------------------------------

HYBRID_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "35 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def test_own_cgroup_dir_on_hybrid_and_delegated_hosts(tmp_path: Path) -> None:
    # The detection checks that the directory is a cgroup (has cgroup.procs): fake one.
    assert own_cgroup_dir("0::/\n4:memory:/x\n", HYBRID_MOUNTS.replace(
        "/sys/fs/cgroup/unified", str(tmp_path)
    )) is None  # fmt: skip
    (tmp_path / "cgroup.procs").write_text("")
    mounts = HYBRID_MOUNTS.replace("/sys/fs/cgroup/unified", str(tmp_path))
    assert own_cgroup_dir("0::/\n", mounts) == str(tmp_path)
    svc = tmp_path / "system.slice" / "plait-workerd.service"
    svc.mkdir(parents=True)
    (svc / "cgroup.procs").write_text("")
    path = "0::/system.slice/plait-workerd.service\n"
    assert own_cgroup_dir(path, mounts) == str(svc)
    # A container that mounts its own part of the hierarchy (root field) at the mount point.
    (tmp_path / "plait-workerd.service").mkdir()
    (tmp_path / "plait-workerd.service" / "cgroup.procs").write_text("")
    bind = f"50 1 0:38 /system.slice {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert own_cgroup_dir(path, bind) == str(tmp_path / "plait-workerd.service")
    assert own_cgroup_dir("1:name=systemd:/\n", mounts) is None  # v1 only


@needs_cgroups
def test_a_cgroup_holds_what_leaves_the_process_group() -> None:
    base = cgroup_base()
    assert base is not None
    tree = CgroupTree.create(base, f"plait-unit-{os.getpid()}")
    try:
        path = tree.new_attempt()
        shell = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                "read -r _; setsid -f sleep 300; echo $(pgrep -n sleep); exec sleep 300",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        join_cgroup(path, shell.pid)
        assert shell.stdin is not None and shell.stdout is not None
        shell.stdin.write("\n")
        shell.stdin.flush()
        escaped = int(shell.stdout.readline())
        wait_until("both in the cgroup", lambda: len(cgroup_members(path)) == 2)
        assert escaped in cgroup_members(path)
        assert remove_cgroup(path)
        assert shell.wait(5) == -9
        wait_until("the escaped child to die", lambda: not alive(escaped))
        assert not os.path.exists(path)
        # A leftover cgroup (an earlier workerd's) is swept.
        stale = tree.new_attempt()
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        join_cgroup(stale, sleeper.pid)
        assert tree.sweep() == 1
        assert sleeper.wait(5) == -9
    finally:
        tree.close()
    assert not os.path.exists(tree.path)


# ----- uid sweeps --------------------------------------------------------------------------------


def run_as(uid: int, *argv: str) -> subprocess.Popen[bytes]:
    assert SETPRIV is not None
    return subprocess.Popen(
        [SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--", *argv],
        start_new_session=True,
    )


@needs_root
def test_a_uid_sweep_kills_every_process_of_the_uid_and_nothing_else() -> None:
    victims = [run_as(62501, "sleep", "300"), run_as(62501, "setsid", "sleep", "300")]
    bystander = run_as(62502, "sleep", "300")
    try:
        wait_until("the sleepers", lambda: len(uid_processes([62501])) >= 2)
        sweep_uid(62501, 62501, SETPRIV)
        wait_until("uid 62501 to be empty", lambda: not uid_processes([62501]))
        assert bystander.poll() is None
    finally:
        for p in [*victims, bystander]:
            p.kill()
            p.wait()


# ----- attempt directories -----------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="plait-unit-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def make_hostile_tree(top: Path, outside: Path) -> None:
    """What an action may leave: read-only and unreadable directories, a symlink out."""
    (top / "ro" / "deep").mkdir(parents=True)
    (top / "ro" / "deep" / "f").write_text("x")
    (top / "ro" / "deep").chmod(0o500)
    (top / "ro").chmod(0o500)
    (top / "locked").mkdir()
    (top / "locked" / "g").write_text("y")
    (top / "locked").chmod(0o000)
    (top / "out").symlink_to(outside)
    top.chmod(0o500)


@needs_root
def test_remove_tree_undoes_an_actions_chmod_without_following_symlinks(shared_dir: Path) -> None:
    outside = shared_dir / "outside"
    outside.mkdir(mode=0o555)
    tmp_root = shared_dir / "root"  # a workerd's tmp root, owned by its (non-root) user
    top = tmp_root / "attempt"
    top.mkdir(parents=True)
    make_hostile_tree(top, outside)
    subprocess.run(["chown", "-R", "62503:62503", str(tmp_root)], check=True)
    # As the user who owns it (a workerd that is not root): root would bypass the modes.
    done = subprocess.run(
        [
            str(SETPRIV), "--reuid", "62503", "--regid", "62503", "--clear-groups", "--",
            sys.executable, "-c",
            "import sys; from plait.workerd.containment import remove_tree;"
            " print(remove_tree(sys.argv[1]))",
            str(top),
        ],
        env={"PYTHONPATH": str(ROOT), "PATH": os.defpath},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.stdout.strip() == "True", done
    assert not top.exists()
    assert outside.stat().st_mode & 0o777 == 0o555  # the symlink's target was not touched


def test_tmp_root_is_private_locked_and_swept(tmp_path: Path) -> None:
    root = tmp_path / "attempts"
    first = prepare_tmp_root(str(root))
    try:
        assert root.stat().st_mode & 0o777 == 0o700
        with pytest.raises(ConfigError, match="in use by another workerd"):
            prepare_tmp_root(str(root))
        left = root / "plait-attempt-old"
        left.mkdir()
        (left / "plait-inputs.json").write_text("{}")
    finally:
        first.close()
    again = prepare_tmp_root(str(root))
    try:
        assert again.swept == 1 and list(root.iterdir()) == []
    finally:
        again.close()


def test_tmp_root_refusals(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        prepare_tmp_root(str(loose))
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        prepare_tmp_root(str(tmp_path / "link"))
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 62504, 62504)
        with pytest.raises(ConfigError, match="owned by uid 62504"):
            prepare_tmp_root(str(theirs))
    # pytest's tmp dirs are 0700: a run-as user could not reach its attempt directory.
    with pytest.raises(ConfigError, match="the run-as user 62505:62505 cannot reach it"):
        prepare_tmp_root(str(tmp_path / "pool"), run_as=[Identity(62505, 62505)])


def test_tmp_root_for_run_as_is_0711(shared_dir: Path) -> None:
    root = prepare_tmp_root(str(shared_dir / "pool"), run_as=[Identity(62505, 62505)])
    try:
        assert (shared_dir / "pool").stat().st_mode & 0o777 == 0o711
    finally:
        root.close()


# ----- the keeper --------------------------------------------------------------------------------


@needs_root
def test_the_keeper_cleans_up_cgroups_dirs_and_uids_when_workerd_dies(shared_dir: Path) -> None:
    base = cgroup_base()
    tree = CgroupTree.create(base, f"plait-keeper-{os.getpid()}") if base else None
    procs: list[subprocess.Popen[bytes]] = []
    lines = []
    try:
        if tree is not None:
            cg = tree.new_attempt()
            in_cgroup = subprocess.Popen(["sleep", "300"], start_new_session=True)
            join_cgroup(cg, in_cgroup.pid)
            procs.append(in_cgroup)
            lines += [f"+c {cg}", f"+p {tree.path}"]
        escaped = run_as(62506, "sleep", "300")
        procs.append(escaped)
        attempt_dir = shared_dir / "plait-attempt-x"
        make_hostile_tree(attempt_dir, shared_dir)
        lines += ["+u 62506:62506", f"+d {attempt_dir}", "+d /nonexistent", "-d /nonexistent"]
        wait_until("the run-as sleeper", lambda: uid_processes([62506]))
        keep([f"{line}\n".encode() for line in lines])  # ... then EOF: workerd died
        for p in procs:
            assert p.wait(5) == -9
        assert not uid_processes([62506])
        assert not attempt_dir.exists()
        if tree is not None:
            assert not os.path.exists(tree.path)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if tree is not None:
            tree.close()
