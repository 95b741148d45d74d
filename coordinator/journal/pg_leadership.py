"""Leadership through a lease row in PostgreSQL (edge layer).

One row, ``plait_leader`` (id 1), names the leader: its ``term`` (one more per election), its
``holder`` and advertised gRPC ``address``, and ``expires_at``. Every expiry is judged by the
database server's clock (``now()``) — coordinators compare nothing with their own wall clocks,
so a standby whose clock is minutes off still takes over exactly when the lease lapses.

The leader renews every ``renew_every`` (``ttl / 3`` by default). It gives up — :meth:`hold`
returns and the coordinator must stop — as soon as a renewal finds the row taken, or when no
renewal has succeeded for a whole ``ttl`` on its own monotonic clock, measured from when the
last successful renewal was *sent*: the server's ``now()`` when it ran was no earlier, so the
leader always concedes before the database considers the lease lapsed. Even a leader that
misses that moment cannot corrupt the journal: every journal write is fenced by the term
(:mod:`.postgres`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import psycopg
from psycopg.rows import TupleRow

from plait.clock import Clock, SystemClock
from plait.coordinator.journal.postgres import ensure_schema
from plait.errors import ConfigError

log = logging.getLogger(__name__)

_CREATE_ROW = (
    "INSERT INTO plait_leader (id, term, holder, address, expires_at)"
    " VALUES (1, 0, '', '', '-infinity') ON CONFLICT (id) DO NOTHING"
)
_CAMPAIGN = (
    "UPDATE plait_leader SET term = term + 1, holder = %s, address = %s, expires_at = now() + %s"
    " WHERE id = 1 AND expires_at < now() RETURNING term"
)
_RENEW = (
    "UPDATE plait_leader SET expires_at = now() + %s"
    " WHERE id = 1 AND term = %s AND holder = %s AND expires_at > now()"
)
_RESIGN = (
    "UPDATE plait_leader SET expires_at = now() - interval '1 second'"
    " WHERE id = 1 AND term = %s AND holder = %s"
)
_LEADER = "SELECT address FROM plait_leader WHERE id = 1 AND expires_at > now()"
_HOLDER = (
    "SELECT holder, address, term, expires_at > now(), expires_at FROM plait_leader WHERE id = 1"
)


class PostgresLeadership:
    """A :class:`~plait.coordinator.journal.store.Leadership` on the ``plait_leader`` row.

    Uses its own connection (never the journal's), opened on first use and re-opened after an
    error. ``holder`` must be unique per coordinator process; ``advertise`` is the gRPC address
    standbys redirect clients to.
    """

    def __init__(
        self,
        url: str,
        *,
        holder: str,
        advertise: str,
        ttl: timedelta,
        renew_every: timedelta | None = None,
        clock: Clock | None = None,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError(f"leadership ttl must be positive, got {ttl}")
        renew_every = renew_every if renew_every is not None else ttl / 3
        if not timedelta(0) < renew_every < ttl:
            raise ValueError(f"renew_every ({renew_every}) must be between 0 and ttl ({ttl})")
        self.url = url
        self.holder = holder
        self.advertise = advertise
        self.ttl = ttl
        self.renew_every = renew_every
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._lock = asyncio.Lock()
        self._term: int | None = None
        # Monotonic time at which the last successful campaign or renewal was sent.
        self._renewed_at = 0.0
        self._resigned = asyncio.Event()
        self._waiting = False  # a campaign attempt found the lease held; not won since

    def _target(self) -> str:
        """The database, named without its password."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "the PostgreSQL journal"
        return f"{info.get('user', '')}@{info.get('host', '')}/{info.get('dbname', '')}"

    @property
    def term(self) -> int | None:
        """The term this coordinator won last, until it resigns."""
        return self._term

    async def _connection(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is None or self._conn.closed:
            # A lock held by a paused writer must not stall the campaign: give up waiting
            # after a fraction of the TTL and retry (the writer's own timeouts free it).
            lock_ms = max(50, int(self.ttl.total_seconds() * 200))
            conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(2, int(self.ttl.total_seconds())),
                options=f"-c lock_timeout={lock_ms}",
            )
            try:
                await ensure_schema(conn)
                await conn.execute(_CREATE_ROW)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _drop(self) -> None:
        """Closes the connection after an error or a timeout; the next call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _execute(
        self, query: str, params: tuple[object, ...]
    ) -> psycopg.AsyncCursor[TupleRow]:
        """Runs one statement; drops the connection on any failure (including a timeout)."""
        async with self._lock:
            try:
                conn = await self._connection()
                return await conn.execute(query, params)
            except BaseException:
                await self._drop()
                raise

    async def campaign(self) -> int:
        poll = (self.ttl / 5).total_seconds()
        while True:
            sent = self._clock.monotonic()
            try:
                async with asyncio.timeout(self.ttl.total_seconds()):
                    cur = await self._execute(_CAMPAIGN, (self.holder, self.advertise, self.ttl))
                    row = await cur.fetchone()
            except psycopg.errors.InsufficientPrivilege as e:  # retrying cannot help
                raise ConfigError(
                    f"cannot open the journal for writing: {self._target()}:"
                    f" {str(e).strip().splitlines()[0]}"
                ) from None
            except (TimeoutError, psycopg.Error) as e:
                log.warning("leadership campaign failed, retrying: %r", e)
                row = None
            if row is not None:
                self._waiting = False
                self._term = int(row[0])
                self._renewed_at = sent
                self._resigned.clear()
                log.info("won leadership", extra={"term": self._term, "holder": self.holder})
                return self._term
            self._waiting = True
            await asyncio.sleep(poll)

    async def hold(self) -> None:
        term = self._term
        if term is None:
            return
        ttl = self.ttl.total_seconds()
        # After a failed renewal, retry sooner: the deadline is getting close.
        every, retry = self.renew_every.total_seconds(), ttl / 10
        failed = False
        while True:
            deadline = self._renewed_at + ttl
            wait = min(retry if failed else every, deadline - self._clock.monotonic())
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._resigned.wait()
                except TimeoutError:
                    pass
            if self._term != term:
                return  # resigned
            sent = self._clock.monotonic()
            remaining = deadline - sent
            if remaining <= 0:
                log.error("leadership lost: no renewal succeeded for %s", self.ttl)
                return
            try:
                async with asyncio.timeout(remaining):
                    cur = await self._execute(_RENEW, (self.ttl, term, self.holder))
            except (TimeoutError, psycopg.Error) as e:
                log.warning("leadership renewal failed: %s", e)
                failed = True
                continue
            if cur.rowcount != 1:
                log.error("leadership lost: term %d superseded or expired", term)
                return
            self._renewed_at, failed = sent, False

    async def leader(self) -> str | None:
        try:
            async with asyncio.timeout(self.ttl.total_seconds()):
                cur = await self._execute(_LEADER, ())
                row = await cur.fetchone()
        except (TimeoutError, psycopg.Error) as e:
            log.warning("cannot read the leader row: %s", e)
            return None
        return str(row[0]) if row is not None else None

    async def waiting_for(self) -> str | None:
        if not self._waiting:
            return None
        try:
            async with asyncio.timeout(self.ttl.total_seconds()):
                cur = await self._execute(_HOLDER, ())
                row = await cur.fetchone()
        except (TimeoutError, psycopg.Error) as e:
            return f"the leader row cannot be read ({type(e).__name__})"
        if row is None:
            return "no coordinator has led this journal yet"
        holder, address, term, live, expires = row
        if not live:
            return f"the lease of term {term} ({holder}, {address}) expired at {expires}"
        return f"the lease is held by {holder} at {address} (term {term})"

    @property
    def poll_interval(self) -> float:
        return (self.ttl / 5).total_seconds()

    async def resign(self) -> None:
        """Ends the lease now so a standby wins at its next poll; closes the connection."""
        term, self._term = self._term, None
        self._resigned.set()
        if term is None:
            await self.close()
            return
        try:
            async with asyncio.timeout(self.ttl.total_seconds()):
                await self._execute(_RESIGN, (term, self.holder))
        except (TimeoutError, psycopg.Error) as e:
            # The lease then lapses on its own within one ttl.
            log.warning("resigning leadership failed: %s", e)
        else:
            log.info("resigned leadership", extra={"term": term, "holder": self.holder})
        # A coordinator resigns to shut down; a later campaign() reconnects.
        await self.close()

    async def close(self) -> None:
        """Closes the connection without resigning: to a standby, this looks like death."""
        async with self._lock:
            await self._drop()
