"""Backends for the storage contract suite: every test runs once per backend.

``sqlite`` uses a file in the test's temp dir. ``postgres`` uses ``PLAIT_TEST_POSTGRES`` (a
``postgresql://`` URL of a role that may create databases) when set; otherwise a throwaway
server started once per session from Debian's binaries (:mod:`tests.system.pg`). Either way,
each test gets a fresh database. Without PostgreSQL binaries the ``postgres`` tests are skipped
— except under CI, where they fail: ``.ci/run`` must install them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from plait.clock import SystemClock
from plait.coordinator.journal.leadership import open_leadership
from plait.coordinator.journal.store import JournalHead, JournalStore, Leadership, open_store
from plait.v1 import workflow_pb2 as pb
from tests import procs
from tests.system import pg

TTL = timedelta(seconds=1)
_databases = itertools.count()


@dataclass
class Leader:
    """A won leadership and the store it opened."""

    lead: Leadership
    term: int
    store: JournalStore
    head: JournalHead


@dataclass
class Backend:
    """One storage backend at one fresh location, and everything a test opened on it."""

    name: str
    url: str
    stores: list[JournalStore] = field(default_factory=list)
    leaderships: list[Leadership] = field(default_factory=list)

    def store(self) -> JournalStore:
        """A new, unopened store (closed after the test)."""
        store = open_store(self.url)
        self.stores.append(store)
        return store

    def leadership(self, name: str, ttl: timedelta = TTL, **extra: Any) -> Leadership:
        """A candidate advertising ``NAME:7450`` (released after the test)."""
        advertise = f"{name}:7450"
        if extra:  # backend-specific knobs (a clock), PostgreSQL only
            from plait.coordinator.journal.pg_leadership import PostgresLeadership

            lead: Leadership = PostgresLeadership(
                self.url, holder=name, advertise=advertise, ttl=ttl, **extra
            )
        else:
            lead = open_leadership(self.url, holder=name, advertise=advertise, ttl=ttl)
        self.leaderships.append(lead)
        return lead

    def candidate(self, name: str) -> tuple[Leadership, Polls]:
        """:meth:`leadership`, with a count of the campaign polls it loses.

        What proves a standby stayed one for a while is polls it made and lost, not time slept:
        on a loaded machine a sleep may pass before the standby has polled at all. A file lock
        is tried once a poll; a lease row is asked once a poll, after a monotonic clock read.
        """
        if self.name == "postgres":
            polls = Polls((TTL / 5).total_seconds())  # PostgresLeadership polls every TTL/5
            lead = self.leadership(name, clock=_PollClock(polls))
            return lead, polls
        lead = self.leadership(name)
        polls = Polls(lead.poll_seconds)  # type: ignore[attr-defined]
        try_lock = lead._try_lock  # type: ignore[attr-defined]

        def counted() -> bool:
            won = bool(try_lock())
            if not won:
                polls.lost()
            return won

        lead._try_lock = counted  # type: ignore[attr-defined]
        return lead, polls

    async def leader_store(self, name: str = "a") -> Leader:
        """Wins leadership, then opens a store fenced by the won term."""
        lead = self.leadership(name)
        term = await lead.campaign()
        store = self.store()
        head = await store.open(term)
        return Leader(lead, term, store, head)

    async def die(self, lead: Leadership) -> None:
        """Simulates the death of a leader's process: no resign, nothing flushed."""
        if self.name == "postgres":
            await lead.close()  # type: ignore[attr-defined]
        else:
            # The kernel drops a flock when its holder's file descriptor goes with the process.
            fd = lead._fd  # type: ignore[attr-defined]
            if fd is not None:
                os.close(fd)
                lead._fd = None  # type: ignore[attr-defined]

    async def release(self) -> None:
        for store in self.stores:
            await store.close()
        for lead in self.leaderships:
            close = getattr(lead, "close", None)
            await (close() if close is not None else lead.resign())


class Polls:
    """How many campaign polls a candidate lost, and a way to wait for more."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds between two polls (a sleep, so at least this)
        self.count = 0
        self._changed = asyncio.Event()

    def lost(self) -> None:
        self.count += 1
        self._changed.set()

    def spanning(self, seconds: float) -> int:
        """How many lost polls in a row take at least ``seconds`` from the first to the last."""
        return math.ceil(seconds / self.interval - 1e-9) + 1

    async def reach(self, count: int, *watched: asyncio.Task[Any]) -> None:
        """Waits until ``count`` polls were lost, or until a ``watched`` task ends (the caller
        then says what that means); pytest-timeout bounds a candidate that stops polling."""
        while self.count < count and not any(task.done() for task in watched):
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, *watched}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()


class _PollClock(SystemClock):
    """The system clock, counting lost polls: a PostgreSQL campaign reads it once per poll, so
    each read after the first means the poll before it lost."""

    def __init__(self, polls: Polls) -> None:
        super().__init__()
        self.polls = polls
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        if self.reads > 1:
            self.polls.lost()
        return super().monotonic()


@dataclass(frozen=True)
class _Postgres:
    url: str | None
    reason: str | None = None


@pytest.fixture(scope="session", autouse=True)
def _postgres_server(request: pytest.FixtureRequest) -> Iterator[_Postgres]:
    """PLAIT_TEST_POSTGRES, or a server of our own when some selected test needs PostgreSQL.

    Autouse and session-wide so the server and its background processes exist before any
    test's leaked-process snapshot is taken.
    """
    if url := os.environ.get("PLAIT_TEST_POSTGRES"):
        yield _Postgres(url)
        return
    if not any("postgres" in item.nodeid for item in request.session.items):
        yield _Postgres(None, "no selected test needs it")
        return
    reason = pg.available()
    if reason is not None:
        yield _Postgres(None, reason)
        return
    server = pg.PgServer().start()
    try:
        yield _Postgres(server.dsn)
    finally:
        server.stop()
        procs.reap_adopted_zombies()


@pytest.fixture
def postgres_admin_url(_postgres_server: _Postgres) -> str:
    """A URL for a role that may create databases; skips (fails under CI) without one."""
    if _postgres_server.url is not None:
        return _postgres_server.url
    if os.environ.get("CI"):
        pytest.fail(
            f"PostgreSQL contract tests cannot run: {_postgres_server.reason}."
            " .ci/run must install the postgresql package (initdb, pg_ctl)."
        )
    pytest.skip(f"PostgreSQL contract tests skipped: {_postgres_server.reason}")


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped (with its sessions) afterwards."""
    import psycopg

    name = f"plait_contract_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_admin_url, name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend in turn, empty; everything the test opened on it is closed afterwards."""
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path}/journal.db")
    else:
        b = Backend("postgres", request.getfixturevalue("postgres_url"))
    try:
        yield b
    finally:
        await b.release()


@pytest.fixture
async def postgres(postgres_url: str) -> AsyncIterator[Backend]:
    """The PostgreSQL backend alone, for behaviour only a lease row has."""
    b = Backend("postgres", postgres_url)
    try:
        yield b
    finally:
        await b.release()


def event(
    sequence: int, workflow_id: str = "wf-1", *, physical_ms: int | None = None
) -> pb.HistoryEvent:
    """A representative journal entry; HLC grows with the sequence unless given."""
    e = pb.HistoryEvent(
        sequence=sequence,
        workflow_id=workflow_id,
        cause=f"heartbeat-w1-{sequence}",
        type=pb.EVENT_TYPE_ACTION_LEASED,
        action_id=f"act-{sequence}",
        action_state=pb.ACTION_STATE_LEASED,
        attempt=1,
        fencing_token=sequence,
        worker_id="w1",
        lease_id=f"lease-{sequence}",
    )
    e.hlc.physical_ms = physical_ms if physical_ms is not None else 1_700_000_000_000 + sequence
    e.hlc.logical = sequence % 3
    return e
