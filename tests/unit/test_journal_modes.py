"""The SQLite journal's files are private: 0600 in a 0700 directory (coordinator edge).

Real files: a journal opened and written, then its files' modes read back; an existing
directory others may write is refused; loose files of ours are tightened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from plait.coordinator.journal.sqlite import FileLockLeadership, SqliteJournal
from plait.errors import ConfigError
from plait.v1 import workflow_pb2 as pb


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_files_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: what is created must not follow it
    try:
        path = tmp_path / "new" / "dir" / "plait.db"
        journal = SqliteJournal(str(path))
        assert mode(path.parent) == 0o700
        leadership = FileLockLeadership(str(path), advertise="127.0.0.1:1")
        term = await leadership.campaign()
        await journal.open(term)
        await journal.append([pb.HistoryEvent(sequence=1, workflow_id="wf")])
        names = sorted(p.name for p in path.parent.iterdir())
        # While open: the database, its WAL and shared memory, the lock and the leader file.
        assert names == sorted(
            ["plait.db", "plait.db-wal", "plait.db-shm", "plait.db.lock", "plait.db.leader"]
        )
        assert {n: mode(path.parent / n) for n in names} == dict.fromkeys(names, 0o600)
        await journal.close()
        await leadership.resign()
    finally:
        os.umask(old)


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError) as err:
        SqliteJournal(str(shared / "plait.db"))
    assert f"journal directory {shared} is mode 1777" in err.value.message
    assert f"chmod 700 {shared}" in err.value.message
    assert not (shared / "plait.db").exists()


def test_a_readable_directory_is_used_and_loose_files_are_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # e.g. the working directory: left as it is
    for suffix in ("", "-wal", ".leader"):
        (tmp_path / f"j.db{suffix}").write_bytes(b"")
        (tmp_path / f"j.db{suffix}").chmod(0o644)
    SqliteJournal(str(tmp_path / "j.db"))
    assert mode(tmp_path) == 0o755
    for suffix in ("", "-wal", ".leader"):
        assert mode(tmp_path / f"j.db{suffix}") == 0o600


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(b"")
    (tmp_path / "j.db-wal").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"j\.db-wal is not a regular file"):
        SqliteJournal(str(tmp_path / "j.db"))
