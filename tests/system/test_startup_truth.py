"""Start-up tells the truth (issue 11): a journal the coordinator cannot write is refused with
exit 2 and one line naming the path and the errno, instead of a silent standby; a disk that fills
up stops the leader with one clear line and no traceback; a standby says whom it waits for.

The journal lives on a real tmpfs mount (read-only, or 2 MiB), so these tests need root and
``mount``; without them they skip, and under CI (``CI`` set, where they run as root) they fail.
Mounts are removed on every exit, failures included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.harness import (
    Cluster,
    Daemon,
    coordinator_argv,
    daemon_env,
    python_action,
    wait_for,
    workflow,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


def _require_mounts(where: Path) -> None:
    """Skips when this sandbox cannot mount a tmpfs; under CI fails instead."""
    reason = None
    if os.geteuid() != 0:
        reason = "not root"
    else:
        where.mkdir()
        try:
            done = _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where))
        except OSError as e:
            reason = f"mount: {e}"
        else:
            if done.returncode != 0:
                reason = f"mount -t tmpfs failed: {done.stderr.strip()}"
            else:
                subprocess.run(["umount", str(where)], check=True, timeout=30)
        where.rmdir()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"start-up tests need a tmpfs mount and cannot make one: {reason}")
    pytest.skip(f"start-up tests need root and mount -t tmpfs: {reason}")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A private (0700) tmpfs of ``size`` at ``where``, unmounted on every exit."""
    _require_mounts(where.parent / (where.name + "-probe"))
    where.mkdir()
    done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    assert done.returncode == 0, done.stderr
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], timeout=30, check=False).returncode != 0:
            subprocess.run(
                ["umount", "-l", str(where)], timeout=30, check=False
            )  # a process still inside


def remount_read_only(where: Path) -> None:
    done = _mount("-o", "remount,ro", str(where))
    assert done.returncode == 0, done.stderr


def run_coordinator(tmp: Path, store: str) -> subprocess.CompletedProcess[str]:
    argv = coordinator_argv(store=store, ready_file=tmp / "ready.json")
    return subprocess.run(
        argv, capture_output=True, text=True, env=daemon_env(), timeout=60, check=False
    )


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-journal"])
def test_read_only_journal_exits_2_naming_path_and_errno(tmp_path: Path, existing: bool) -> None:
    with tmpfs(tmp_path / "journal", "2m") as journal:
        db = journal / "plait.db"
        if existing:  # the measured case: a journal that was written, then mounted read-only
            conn = sqlite3.connect(db)
            conn.execute("CREATE TABLE t (x)")
            conn.close()
            db.chmod(0o600)
            (journal / "plait.db.lock").touch(0o600)
        remount_read_only(journal)
        done = run_coordinator(tmp_path, f"sqlite:///{db}")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    refusals = [line for line in lines if "cannot open the journal for writing" in line]
    assert len(refusals) == 1, done.stderr
    assert str(journal) in refusals[0], refusals[0]
    assert "Errno 30" in refusals[0] and "Read-only file system" in refusals[0], refusals[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ready.json").exists(), "it must not serve, even as a standby"


class JournalElsewhere(Cluster):
    """A cluster whose journal is ``journal_dir/plait.db`` (logs stay in ``tmp``)."""

    journal_dir: Path = Path("/nonexistent")

    @property
    def store(self) -> str:
        return f"sqlite:///{self.journal_dir}/plait.db"


@pytest.mark.usefixtures("coordinator_available", "workerd_available")
def test_disk_full_stops_with_one_clear_line(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "journal", "2m") as journal:
        cluster = JournalElsewhere(tmp_path)
        cluster.journal_dir = journal
        try:
            cluster.start_coordinator()
            cluster.add_worker("w1", slots=4)
            # Twelve outputs of 300 kB each: 3.6 MB, far more than the 2 MiB mount holds.
            actions = [
                python_action(f"big{i}", f'plait_output({{"blob": "x" * {300_000}}})')
                for i in range(12)
            ]
            cluster.submit(workflow("fill-the-disk", actions))
            coordinator = cluster.daemon("coordinator")
            code = coordinator.wait(120)
            log = coordinator.log_tail(200_000)
            assert code is not None, f"the coordinator kept running on a full disk:\n{log}"
        finally:
            cluster.close()
    assert code == 1, log
    full = [line for line in log.splitlines() if "journal commit failed: disk full" in line]
    assert len(full) == 1, log
    assert "(ENOSPC)" in full[0] and str(journal / "plait.db") in full[0], full[0]
    assert "stopping" in full[0], full[0]
    assert "never retrieved" not in log, log
    assert "Traceback" not in log, log


@pytest.mark.usefixtures("coordinator_available")
def test_standby_says_whom_it_waits_for(cluster: Cluster) -> None:
    leader = cluster.start_coordinator()
    ready = cluster.tmp / "standby.ready.json"
    standby = Daemon(
        "standby",
        coordinator_argv(store=cluster.store, ready_file=ready),
        daemon_env(),
        cluster.tmp / "standby.log",
    )
    cluster.daemons["standby"] = standby
    standby.start()

    def standby_line() -> str | None:
        if not standby.running():
            raise AssertionError(f"the standby exited:\n{standby.log_tail()}")
        lines = [ln for ln in standby.log_tail().splitlines() if "standby:" in ln]
        return lines[0] if lines else None

    line = wait_for("the standby's reason", standby_line, 60)
    assert leader.grpc in line, line
    assert f"pid {leader.pid}" in line, line
    assert "plait.db.lock" in line, line
    assert "every 0.1s" in line, line
    # It takes over when the leader dies; by then it has polled many times but said why once.
    cluster.daemon("coordinator").send(signal.SIGKILL)
    wait_for(
        "the standby to lead",
        lambda: "leader (term" in standby.log_tail() or None,
        60,
    )
    log = standby.log_tail()
    assert log.count("standby:") == 1, log
    assert "Traceback" not in log, log


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
