"""PostgreSQL journal (edge layer): the high-availability backend.

Several coordinators point at one database; :mod:`.pg_leadership` elects one of them through
the ``plait_leader`` row, whose ``term`` grows with every election. Every write here runs in one
transaction that first takes a share lock on that row and compares its term with the one the
store was opened with: an election (an ``UPDATE`` of the row) therefore either commits before
the check, and the deposed writer rolls back with :class:`DeposedError`, or waits until the
writer's commit is done. A deposed leader can never interleave its writes with its successor's.

Two connections: the writer (appends, prunes) and the reader (``read``, ``replay``), so a
history read never queues behind a commit. Batches go in with binary ``COPY``: measured against
``executemany`` and ``INSERT ... SELECT unnest(...)``, it is as fast for one event (the commit's
fsync dominates) and 2-4x faster for hundreds or thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, Final

import psycopg
from psycopg.rows import TupleRow

from plait.coordinator.journal.store import (
    PAGE_SIZE,
    REVOKED_PREFIX,
    DeposedError,
    JournalHead,
)
from plait.hlc import HlcTimestamp
from plait.v1 import workflow_pb2 as pb

SCHEMA_VERSION: Final = 1
# Serialises schema creation: CREATE ... IF NOT EXISTS is not race-free between sessions.
_SCHEMA_LOCK_KEY: Final = 0x706C6169_74000001
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS plait_events (
        sequence     bigint PRIMARY KEY,
        workflow_id  text   NOT NULL,
        hlc_physical bigint NOT NULL,
        hlc_logical  int    NOT NULL,
        type         int    NOT NULL,
        payload      bytea  NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS plait_events_by_workflow ON plait_events (workflow_id, sequence)",
    "CREATE TABLE IF NOT EXISTS plait_meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS plait_leader (
        id         int         PRIMARY KEY CHECK (id = 1),
        term       bigint      NOT NULL,
        holder     text        NOT NULL,
        address    text        NOT NULL,
        expires_at timestamptz NOT NULL
    )""",
)
_FENCED_APPEND: Final = """
WITH leader AS (SELECT term FROM plait_leader WHERE id = 1 FOR SHARE),
ok AS (SELECT 1 FROM leader WHERE term = %(term)s),
events AS (
    INSERT INTO plait_events (sequence, workflow_id, hlc_physical, hlc_logical, type, payload)
    SELECT * FROM unnest(%(seq)s::bigint[], %(wf)s::text[], %(phys)s::bigint[],
                         %(logical)s::int[], %(typ)s::int[], %(payload)s::bytea[])
    WHERE EXISTS (SELECT 1 FROM ok)
    RETURNING 1
),
ceiling AS (
    INSERT INTO plait_meta (key, value)
    SELECT 'hlc_ceiling_ms', %(ceiling)s::text
    WHERE %(ceiling)s::text IS NOT NULL AND EXISTS (SELECT 1 FROM ok)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value
    RETURNING 1
)
SELECT (SELECT term FROM leader), (SELECT count(*) FROM events), (SELECT count(*) FROM ceiling)
"""
# The head survives pruning the newest events: prune records it here first.
_PRUNED_HEAD: Final = "pruned_head"
_CEILING: Final = "hlc_ceiling_ms"
_UPSERT_META: Final = (
    "INSERT INTO plait_meta (key, value) VALUES (%s, %s)"
    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)


async def ensure_schema(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    """Creates every Plait table if missing; safe when several coordinators start at once."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        cur = await conn.execute(
            "SELECT to_regclass('plait_events') IS NOT NULL"
            " AND to_regclass('plait_events_by_workflow') IS NOT NULL"
            " AND to_regclass('plait_meta') IS NOT NULL AND to_regclass('plait_leader') IS NOT NULL"
        )
        found = await cur.fetchone()
        if found is not None and found[0]:
            return  # no DDL: it would queue behind any lock a paused writer holds
        for statement in _SCHEMA:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO plait_meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )


class PostgresJournal:
    """A :class:`~plait.coordinator.journal.store.JournalStore` in a PostgreSQL database."""

    def __init__(self, url: str, *, hold_limit: timedelta = timedelta(seconds=10)) -> None:
        self.url = url
        # No statement or open transaction may outlive this: a writer paused mid-commit
        # (SIGSTOP, a GC pause) must not keep its row lock on plait_leader, or the election of
        # its successor would wait for it. Keep it below the leadership TTL.
        ms = max(100, int(hold_limit.total_seconds() * 1000))
        self._options = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        self._term: int | None = None
        self._writer: psycopg.AsyncConnection[TupleRow] | None = None
        self._reader: psycopg.AsyncConnection[TupleRow] | None = None
        # read_outputs is synchronous (the pure core calls it): its own blocking connection.
        self._outputs: psycopg.Connection[TupleRow] | None = None
        # One transaction at a time on the writer connection.
        self._write_lock = asyncio.Lock()

    @property
    def term(self) -> int:
        """The leadership term the store was opened with (0 before :meth:`open`)."""
        return self._term or 0

    async def open(self, term: int) -> JournalHead:
        self._term = term
        try:
            self._writer = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, options=self._options
            )
            self._reader = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, options=self._options
            )
            await ensure_schema(self._writer)
            return await self._head()
        except BaseException:
            await self.close()
            raise

    async def _head(self) -> JournalHead:
        conn = self._conn()
        async with conn.transaction(), conn.cursor() as cur:
            await self._check_term(cur, "open")
            await cur.execute(
                "SELECT sequence, hlc_physical, hlc_logical FROM plait_events"
                " ORDER BY sequence DESC LIMIT 1"
            )
            last = await cur.fetchone()
            await cur.execute(
                "SELECT key, value FROM plait_meta WHERE key IN (%s, %s)", (_CEILING, _PRUNED_HEAD)
            )
            meta = {str(k): str(v) for k, v in await cur.fetchall()}
        head = (int(last[0]), int(last[1]), int(last[2])) if last else (0, 0, 0)
        if _PRUNED_HEAD in meta:
            seq, physical, logical = (int(x) for x in meta[_PRUNED_HEAD].split(","))
            head = max(head, (seq, physical, logical))
        return JournalHead(
            last_sequence=head[0],
            last_hlc=HlcTimestamp(head[1], head[2]),
            hlc_ceiling_ms=int(meta.get(_CEILING, "0")),
        )

    async def _check_term(self, cur: psycopg.AsyncCursor[TupleRow], what: str) -> None:
        """Raises DeposedError unless the leader row still carries our term.

        ``FOR SHARE`` holds the row until the transaction ends, so no election can commit
        between this check and our commit.
        """
        await cur.execute("SELECT term FROM plait_leader WHERE id = 1 FOR SHARE")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current != self._term:
            raise DeposedError(f"journal {what} refused: term {self._term} superseded by {current}")

    def _conn(self, reader: bool = False) -> psycopg.AsyncConnection[TupleRow]:
        conn = self._reader if reader else self._writer
        if conn is None:
            raise RuntimeError("journal not open")
        return conn

    async def append(
        self, events: Sequence[pb.HistoryEvent], *, hlc_ceiling_ms: int | None = None
    ) -> None:
        if not events and hlc_ceiling_ms is None:
            return
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
        # ONE statement in autocommit: the term check, the inserts and the ceiling commit or
        # fail together, and no lock is ever held while the server waits on this client (a
        # COPY, or a transaction spanning several statements, would keep the leader row locked
        # through a SIGSTOP or a GC pause and stall the election of a successor).
        params = {
            "term": self._term,
            "seq": [r[0] for r in rows],
            "wf": [r[1] for r in rows],
            "phys": [r[2] for r in rows],
            "logical": [r[3] for r in rows],
            "typ": [r[4] for r in rows],
            "payload": [r[5] for r in rows],
            "ceiling": None if hlc_ceiling_ms is None else str(hlc_ceiling_ms),
        }
        async with self._write_lock, self._conn().cursor() as cur:
            await cur.execute(_FENCED_APPEND, params)
            row = await cur.fetchone()
        if row is None or row[0] is None or int(row[0]) != self._term:
            current = int(row[0]) if row and row[0] is not None else 0
            raise DeposedError(f"journal write refused: term {self._term} superseded by {current}")

    async def read(
        self, workflow_id: str, after_sequence: int = 0, limit: int = PAGE_SIZE
    ) -> list[pb.HistoryEvent]:
        async with self._conn(reader=True).cursor(binary=True) as cur:
            await cur.execute(
                "SELECT payload FROM plait_events WHERE workflow_id = %s AND sequence > %s"
                " ORDER BY sequence LIMIT %s",
                (workflow_id, after_sequence, limit),
            )
            return [pb.HistoryEvent.FromString(r[0]) for r in await cur.fetchall()]

    def read_outputs(self, sequence: int) -> str | None:
        conn = self._outputs
        if conn is None or conn.closed:
            if self._writer is None:
                raise RuntimeError("journal not open")
            conn = self._outputs = psycopg.Connection.connect(
                self.url, autocommit=True, options=self._options
            )
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT payload FROM plait_events WHERE sequence = %s", (sequence,))
            row = cur.fetchone()
        return None if row is None else pb.HistoryEvent.FromString(row[0]).outputs_json

    async def _replay_page(self, after: int, batch: int) -> list[tuple[Any, ...]]:
        async with self._conn(reader=True).cursor(binary=True) as cur:
            await cur.execute(
                "SELECT sequence, payload FROM plait_events WHERE sequence > %s"
                " ORDER BY sequence LIMIT %s",
                (after, batch),
            )
            return await cur.fetchall()

    async def replay(self, batch: int = PAGE_SIZE) -> AsyncIterator[list[pb.HistoryEvent]]:
        # Keyset pagination: no transaction stays open between batches, however slowly the
        # caller consumes them. Reads ahead: the next page's query is sent before this page is
        # handed over, so the server works on it while the caller applies this one.
        ahead = asyncio.ensure_future(self._replay_page(0, batch))
        try:
            while True:
                rows = await ahead
                if not rows:
                    return
                full = len(rows) == batch
                if full:
                    ahead = asyncio.ensure_future(self._replay_page(int(rows[-1][0]), batch))
                    await asyncio.sleep(0)  # let it send the query before the caller runs
                parse = pb.HistoryEvent.FromString
                yield [parse(r[1]) for r in rows]
                if not full:
                    return
        finally:
            # A caller that stops early: let the read in flight finish (cancelling a query
            # midway could leave the reader connection busy), and drop its rows.
            if not ahead.done():
                with contextlib.suppress(Exception):
                    await ahead

    async def prune(self, workflow_ids: Sequence[str]) -> int:
        if not workflow_ids:
            return 0
        conn = self._conn()
        async with self._write_lock, conn.transaction(), conn.cursor() as cur:
            await self._check_term(cur, "prune")
            # Keep the head even if the newest events go, so sequences are never reused.
            await cur.execute(
                "SELECT sequence, hlc_physical, hlc_logical FROM plait_events"
                " ORDER BY sequence DESC LIMIT 1"
            )
            last = await cur.fetchone()
            if last is not None:
                await cur.execute(_UPSERT_META, (_PRUNED_HEAD, ",".join(str(x) for x in last)))
            await cur.execute(
                "DELETE FROM plait_events WHERE workflow_id = ANY(%s)", (list(workflow_ids),)
            )
            return cur.rowcount

    async def revocations(self) -> dict[str, str]:
        async with self._conn(reader=True).cursor() as cur:
            await cur.execute(
                "SELECT key, value FROM plait_meta WHERE starts_with(key, %s)", (REVOKED_PREFIX,)
            )
            return {str(k)[len(REVOKED_PREFIX) :]: str(v) for k, v in await cur.fetchall()}

    async def set_revocation(self, worker_id: str, record: str | None) -> None:
        conn = self._conn()
        # Rare, short, and fenced like prune: the term check holds the leader row only for
        # this transaction (the writer's statement timeouts bound it).
        async with self._write_lock, conn.transaction(), conn.cursor() as cur:
            await self._check_term(cur, "revocation")
            if record is None:
                await cur.execute(
                    "DELETE FROM plait_meta WHERE key = %s", (REVOKED_PREFIX + worker_id,)
                )
            else:
                await cur.execute(_UPSERT_META, (REVOKED_PREFIX + worker_id, record))

    async def close(self) -> None:
        if self._outputs is not None:
            self._outputs.close()
            self._outputs = None
        for attr in ("_writer", "_reader"):
            conn: psycopg.AsyncConnection[TupleRow] | None = getattr(self, attr)
            if conn is not None:
                setattr(self, attr, None)
                await conn.close()
