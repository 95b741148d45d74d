"""SQLite journal and file-lock leadership (edge layer): the embedded default.

WAL mode with ``synchronous=FULL`` (NORMAL can lose commits on power loss). All writes happen
on one dedicated thread with one connection, a batch per transaction; reads use a second
connection on another thread, which WAL lets run beside the writer.

Leadership is an exclusive ``flock`` on ``PATH.lock``: a second coordinator pointed at the same
file waits as a standby and takes over the moment the first one dies (the kernel drops the lock
with the process), so no term fencing is needed inside the database itself.

File modes (:func:`private_journal_dir`): the journal holds every input and output, so its files
(``PATH``, ``-wal``, ``-shm``, ``.lock``, ``.leader``) are created 0600 — SQLite gives ``-wal``
and ``-shm`` the database's mode, so the database is created 0600 before SQLite opens it — and
a missing directory is created 0700. An existing directory is used as it is unless another
user owns it or group or others may write to it (they could plant or swap the journal's files):
then the coordinator refuses to start. Existing files of ours with looser modes are tightened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from plait.coordinator.journal.store import (
    PAGE_SIZE,
    REVOKED_PREFIX,
    DeposedError,
    JournalFullError,
    JournalHead,
)
from plait.errors import ConfigError
from plait.hlc import HlcTimestamp
from plait.v1 import workflow_pb2 as pb

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    sequence     INTEGER PRIMARY KEY,
    workflow_id  TEXT    NOT NULL,
    hlc_physical INTEGER NOT NULL,
    hlc_logical  INTEGER NOT NULL,
    type         INTEGER NOT NULL,
    payload      BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_workflow ON events (workflow_id, sequence);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_PRUNE_CHUNK = 200


JOURNAL_DIR_MODE = 0o700
JOURNAL_FILE_MODE = 0o600
# Every file beside the database that SQLite or the file-lock leadership writes.
JOURNAL_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock", ".leader")


def private_journal_dir(path: str) -> None:
    """Makes ``path``'s directory safe for the journal (see the module docstring).

    Creates it 0700 when missing; refuses one another user owns or group or others may write;
    tightens to 0600 any journal file of ours that is looser.

    Raises:
        ConfigError: the directory or a journal file is not private; the message says why.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=JOURNAL_DIR_MODE)
        os.chmod(directory, JOURNAL_DIR_MODE)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"journal directory {directory}: {e.strerror or e}") from None
    st = os.stat(directory)
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise ConfigError(
            f"journal directory {directory} belongs to uid {st.st_uid}, not to this process"
            f" (uid {uid}): its owner could replace the journal's files; use a directory of"
            " this user's, mode 0700"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"journal directory {directory} is mode {stat.S_IMODE(st.st_mode):04o}: group or"
            " others may write there and plant or swap the journal's files (-wal, -shm); use"
            f" a directory only its owner can write (chmod 700 {directory})"
        )
    for suffix in JOURNAL_SUFFIXES:
        try:
            _tighten(path + suffix, uid)
        except OSError as e:  # e.g. a read-only mount: chmod fails before any write would
            raise ConfigError(unwritable(e.filename or path + suffix, e)) from None


def unwritable(path: str, err: OSError) -> str:
    """The one line a coordinator that cannot write its journal stops with."""
    code = errno.errorcode.get(err.errno or 0, "")
    return (
        f"cannot open the journal for writing: {path}: [Errno {err.errno}"
        f"{' ' + code if code else ''}] {err.strerror or err}"
    )


def probe_writable(path: str) -> None:
    """Proves the journal can be written before a coordinator campaigns for it.

    Opens (creating if missing) the lock file and the database read-write, and creates, writes,
    syncs and removes a probe file beside them (SQLite must create ``-wal`` there). A read-only
    mount (EROFS), an immutable file (EPERM), a directory this user may not write (EACCES) or a
    full disk (ENOSPC) is refused here, instead of leaving the coordinator a standby forever.

    Raises:
        ConfigError: ``cannot open the journal for writing: PATH: [Errno N CODE] reason``.
    """
    probe = f"{path}.probe-{os.getpid()}"
    for file in (path + ".lock", path):
        try:
            _create_private(file)
        except OSError as e:
            raise ConfigError(unwritable(file, e)) from None
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(unwritable(probe, e)) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _tighten(file: str, uid: int) -> None:
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
        raise ConfigError(
            f"journal file {file} is not a regular file of this process's user (uid {uid});"
            " move it away or fix its owner"
        )
    if stat.S_IMODE(st.st_mode) & ~JOURNAL_FILE_MODE:
        os.chmod(file, JOURNAL_FILE_MODE)


def _create_private(file: str) -> None:
    """Creates ``file`` (if missing) with mode 0600, whatever the umask."""
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, JOURNAL_FILE_MODE)
    try:
        os.fchmod(fd, JOURNAL_FILE_MODE)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses the cyclic collector (if it was on) for a replay page's read and parse.

    Everything read here lives on in the state replay rebuilds, so a collection would only
    scan that whole growing state for nothing (about a fifth of a replay's CPU time). The
    caller pauses it too while it applies a page (``core.replay``); each side resumes it only
    if it found it on, so it is on again once both are done, whichever finishes first.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class SqliteJournal:
    """A :class:`~plait.coordinator.journal.store.JournalStore` on a local SQLite file."""

    def __init__(self, path: str) -> None:
        private_journal_dir(path)  # at construction, so a refusal stops start-up (exit 2)
        probe_writable(path)
        self.path = path
        self.term = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="plait-journal-w")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="plait-journal-r")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._oconn: sqlite3.Connection | None = None  # read_outputs, on the caller's thread

    def _open(self) -> JournalHead:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), JOURNAL_DIR_MODE, exist_ok=True)
        _create_private(self.path)  # SQLite creates -wal and -shm with the database's mode
        conn = self._wconn = _connect(self.path)
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute(
            "SELECT sequence, hlc_physical, hlc_logical FROM events ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        ceiling_ms = int(meta.get("hlc_ceiling_ms", 0))
        # Pruning may have removed the newest rows; sequences are never reused.
        pruned = int(meta.get("pruned_through_sequence", 0))
        if row is None:
            return JournalHead(pruned, hlc_ceiling_ms=ceiling_ms)
        return JournalHead(max(row[0], pruned), HlcTimestamp(row[1], row[2]), ceiling_ms)

    async def open(self, term: int) -> JournalHead:
        self.term = term
        loop = asyncio.get_running_loop()
        head = await loop.run_in_executor(self._writer, self._open)
        self._rconn = await loop.run_in_executor(self._reader, _connect, self.path)
        return head

    def _append(self, events: Sequence[pb.HistoryEvent], ceiling_ms: int | None) -> None:
        conn = self._wconn
        assert conn is not None, "journal not open"
        rows = [
            (
                e.sequence,
                e.workflow_id,
                e.hlc.physical_ms,
                e.hlc.logical,
                e.type,
                e.SerializeToString(),
            )
            for e in events
        ]
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_term(conn)
            conn.executemany(
                "INSERT INTO events (sequence, workflow_id, hlc_physical, hlc_logical, type,"
                " payload) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if ceiling_ms is not None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('hlc_ceiling_ms', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(ceiling_ms),),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _check_term(self, conn: sqlite3.Connection) -> None:
        # Belt and braces beside the file lock: a writer whose term was superseded (its lock
        # lost to a successor, e.g. the lock file removed) must not write.
        row = conn.execute("SELECT value FROM meta WHERE key = 'term'").fetchone()
        current = int(row[0]) if row else 0
        if current != self.term:
            raise DeposedError(f"journal write refused: term {self.term} superseded by {current}")

    async def append(
        self, events: Sequence[pb.HistoryEvent], *, hlc_ceiling_ms: int | None = None
    ) -> None:
        if events or hlc_ceiling_ms is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._writer, self._append, events, hlc_ceiling_ms
                )
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise JournalFullError(errno.ENOSPC, "disk full", self.path) from e
                raise
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise JournalFullError(errno.ENOSPC, "disk full", self.path) from e
                raise

    def _read(self, workflow_id: str, after: int, limit: int) -> list[pb.HistoryEvent]:
        conn = self._rconn
        assert conn is not None, "journal not open"
        rows = conn.execute(
            "SELECT payload FROM events WHERE workflow_id = ? AND sequence > ?"
            " ORDER BY sequence LIMIT ?",
            (workflow_id, after, limit),
        ).fetchall()
        return [pb.HistoryEvent.FromString(r[0]) for r in rows]

    async def read(
        self, workflow_id: str, after_sequence: int = 0, limit: int = PAGE_SIZE
    ) -> list[pb.HistoryEvent]:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read, workflow_id, after_sequence, limit
        )

    def read_outputs(self, sequence: int) -> str | None:
        conn = self._oconn
        if conn is None:
            assert self._wconn is not None, "journal not open"
            conn = self._oconn = _connect(self.path)
        row = conn.execute("SELECT payload FROM events WHERE sequence = ?", (sequence,)).fetchone()
        return None if row is None else pb.HistoryEvent.FromString(row[0]).outputs_json

    def _page(self, after: int, limit: int) -> list[pb.HistoryEvent]:
        conn = self._rconn
        assert conn is not None, "journal not open"
        parse = pb.HistoryEvent.FromString
        with _collector_paused():
            rows = conn.execute(
                "SELECT payload FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (after, limit),
            ).fetchall()
            return [parse(payload) for (payload,) in rows]

    async def replay(self, batch: int = PAGE_SIZE) -> AsyncIterator[list[pb.HistoryEvent]]:
        # Reads ahead: the reader thread fetches the next page while the caller applies this
        # one (SQLite leaves the GIL while it reads). Pages follow on by sequence, so the next
        # one's start is known as soon as this one is.
        loop = asyncio.get_running_loop()
        ahead = loop.run_in_executor(self._reader, self._page, 0, batch)
        try:
            while True:
                page = await ahead
                if not page:
                    return
                ahead = loop.run_in_executor(self._reader, self._page, page[-1].sequence, batch)
                yield page
        finally:
            ahead.cancel()  # a caller that stops early: an unstarted read is dropped

    def _prune(self, workflow_ids: Sequence[str]) -> int:
        conn = self._wconn
        assert conn is not None, "journal not open"
        deleted = 0
        for i in range(0, len(workflow_ids), _PRUNE_CHUNK):
            chunk = list(workflow_ids[i : i + _PRUNE_CHUNK])
            marks = ",".join("?" * len(chunk))
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._check_term(conn)
            except DeposedError:
                conn.execute("ROLLBACK")
                raise
            conn.execute(
                "INSERT INTO meta (key, value) SELECT 'pruned_through_sequence',"
                f" COALESCE(MAX(sequence), 0) FROM events WHERE workflow_id IN ({marks})"
                " ON CONFLICT (key) DO UPDATE SET value ="
                " MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                chunk,
            )
            cur = conn.execute(f"DELETE FROM events WHERE workflow_id IN ({marks})", chunk)
            conn.execute("COMMIT")
            deleted += cur.rowcount
        return deleted

    async def prune(self, workflow_ids: Sequence[str]) -> int:
        if not workflow_ids:
            return 0
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, self._prune, workflow_ids
        )

    def _revocations(self) -> dict[str, str]:
        conn = self._wconn
        assert conn is not None, "journal not open"
        rows = conn.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(REVOKED_PREFIX), REVOKED_PREFIX),
        ).fetchall()
        return {str(k)[len(REVOKED_PREFIX) :]: str(v) for k, v in rows}

    async def revocations(self) -> dict[str, str]:
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._revocations)

    def _set_revocation(self, worker_id: str, record: str | None) -> None:
        conn = self._wconn
        assert conn is not None, "journal not open"
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_term(conn)
            if record is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (REVOKED_PREFIX + worker_id,))
            else:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (REVOKED_PREFIX + worker_id, record),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def set_revocation(self, worker_id: str, record: str | None) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._set_revocation, worker_id, record
        )

    async def close(self) -> None:
        if self._oconn is not None:
            self._oconn.close()
            self._oconn = None
        loop = asyncio.get_running_loop()
        for pool, attr in ((self._writer, "_wconn"), (self._reader, "_rconn")):
            conn = getattr(self, attr)
            if conn is not None:
                await loop.run_in_executor(pool, conn.close)
                setattr(self, attr, None)
            pool.shutdown(wait=True)


class FileLockLeadership:
    """:class:`~plait.coordinator.journal.store.Leadership` for one SQLite file on one host."""

    def __init__(self, path: str, *, advertise: str, poll_seconds: float = 0.1) -> None:
        self.path = path
        self.advertise = advertise
        self.poll_seconds = poll_seconds
        self._fd: int | None = None
        self._lost = asyncio.Event()
        self._waiting = False  # an attempt found the lock held; not won since

    def _try_lock(self) -> bool:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), JOURNAL_DIR_MODE, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, JOURNAL_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _next_term(self) -> int:
        _create_private(self.path)  # elected before the journal opens: it may create the file
        conn = _connect(self.path)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT value FROM meta WHERE key = 'term'").fetchone()
            term = (int(row[0]) if row else 0) + 1
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('term', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(term),),
            )
            conn.execute("COMMIT")
            return term
        finally:
            conn.close()

    def _elected(self) -> int:
        term = self._next_term()
        leader = self.path + ".leader"
        _create_private(leader)
        with open(leader, "w") as f:
            json.dump({"address": self.advertise, "term": term, "pid": os.getpid()}, f)
        return term

    async def campaign(self) -> int:
        # Polled: a blocking flock would pin a thread that cancellation cannot free.
        while not self._try_lock():  # no event to await for a kernel lock: polled
            self._waiting = True
            await asyncio.sleep(self.poll_seconds)
        self._waiting = False
        return await asyncio.to_thread(self._elected)

    async def hold(self) -> None:
        # The kernel holds the lock for as long as this process lives; only resign() ends it.
        await self._lost.wait()

    def _read_info(self) -> dict[str, object]:
        try:
            with open(self.path + ".leader") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _read_leader(self) -> str | None:
        address = self._read_info().get("address")
        return address if isinstance(address, str) else None

    async def leader(self) -> str | None:
        return await asyncio.to_thread(self._read_leader)

    def _describe_holder(self) -> str:
        info = self._read_info()
        lock = f"the lock {self.path}.lock"
        if not info:
            return f"{lock} is held by another process (it has not recorded itself yet)"
        parts = [f"{k} {info[k]}" for k in ("pid", "term") if k in info]
        return f"{lock} is held by the leader at {info.get('address')} ({', '.join(parts)})"

    async def waiting_for(self) -> str | None:
        if not self._waiting:
            return None
        return await asyncio.to_thread(self._describe_holder)

    @property
    def poll_interval(self) -> float:
        return self.poll_seconds

    async def resign(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".leader")
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._lost.set()
