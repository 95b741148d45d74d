"""SQLite journal (edge layer): the embedded default.

WAL mode with ``synchronous=FULL`` (NORMAL can lose commits on power loss). All writes happen
on one dedicated thread with one connection, a batch per transaction; reads use a second
connection on another thread, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from plait.coordinator.journal.store import JournalHead
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


class SqliteJournal:
    """A :class:`~plait.coordinator.journal.store.JournalStore` on a local SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="plait-journal-w")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="plait-journal-r")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _open(self) -> JournalHead:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = self._wconn = self._connect()
        conn.executescript(_SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute(
            "SELECT sequence, hlc_physical, hlc_logical FROM events ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return JournalHead()
        return JournalHead(row[0], HlcTimestamp(row[1], row[2]))

    async def open(self) -> JournalHead:
        loop = asyncio.get_running_loop()
        head = await loop.run_in_executor(self._writer, self._open)
        self._rconn = await loop.run_in_executor(self._reader, self._connect)
        return head

    def _append(self, events: Sequence[pb.HistoryEvent]) -> None:
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
            conn.executemany(
                "INSERT INTO events (sequence, workflow_id, hlc_physical, hlc_logical, type,"
                " payload) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def append(self, events: Sequence[pb.HistoryEvent]) -> None:
        if events:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._append, events)

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
        self, workflow_id: str, after_sequence: int = 0, limit: int = 10_000
    ) -> list[pb.HistoryEvent]:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read, workflow_id, after_sequence, limit
        )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for pool, attr in ((self._writer, "_wconn"), (self._reader, "_rconn")):
            conn = getattr(self, attr)
            if conn is not None:
                await loop.run_in_executor(pool, conn.close)
                setattr(self, attr, None)
            pool.shutdown(wait=True)
