"""The journal's storage contract, and leadership (edge layer).

The coordinator is the journal's single writer. Events are appended in batches (one
transaction per batch: group commit) in strictly increasing ``sequence``; an append returns
only once the batch is durable. Readers fetch a workflow's history by sequence; a restarted or
newly elected coordinator :meth:`JournalStore.replay`\\ s everything to rebuild its state.

Only the leader writes. :class:`Leadership` decides who that is: a file lock for SQLite (a
second coordinator on the same file waits as a standby), a lease row with a growing term for
PostgreSQL. Every append is fenced by the term the store was opened with, so a deposed leader's
writes are refused (:class:`DeposedError`) instead of interleaving with its successor's.

Backends: SQLite (embedded default, :mod:`.sqlite`) and PostgreSQL (:mod:`.postgres`); one
contract test suite (``tests/contract``) runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, NamedTuple, Protocol

from plait.errors import UnavailableError
from plait.hlc import ZERO, HlcTimestamp
from plait.v1 import workflow_pb2 as pb

PAGE_SIZE = 10_000
"""Events per page whenever a store reads many (a workflow's history, the replay): one setting
for every backend."""

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")


class StoreUrl(NamedTuple):
    """A ``--store`` URL taken apart: which backend, and what it opens."""

    kind: Literal["sqlite", "postgresql"]
    target: str
    """The database file for SQLite; the whole URL (a libpq conninfo) for PostgreSQL."""


def parse_store_url(url: str) -> StoreUrl:
    """The one reading of a store URL: ``sqlite:///PATH`` (``sqlite:////abs`` for an absolute
    path) or ``postgresql://USER@HOST/DB`` (``postgres://`` too).

    Raises:
        ValueError: any other scheme, or no path after ``sqlite:///``.
    """
    if url.startswith(_SQLITE) and len(url) > len(_SQLITE):
        return StoreUrl("sqlite", url.removeprefix(_SQLITE))
    if url.startswith(_POSTGRES):
        return StoreUrl("postgresql", url)
    raise ValueError(f"store {url!r}: expected sqlite:///PATH or postgresql://USER@HOST/DB")


@dataclass(frozen=True, slots=True)
class JournalHead:
    """Where the journal ends: the next writer continues above every number here."""

    last_sequence: int = 0
    last_hlc: HlcTimestamp = ZERO
    # Upper bound on every HLC reading the previous writer may have sent (see
    # JournalStore.append); a new writer starts its clock above it.
    hlc_ceiling_ms: int = 0

    @property
    def hlc_floor(self) -> HlcTimestamp:
        """The reading a new writer's HLC must start above."""
        return max(self.last_hlc, HlcTimestamp(self.hlc_ceiling_ms, 0))


class DeposedError(UnavailableError):
    """This coordinator's term is over: another leader has been elected. Stop at once."""


class JournalFullError(OSError):
    """The journal's disk is full (``errno.ENOSPC``, ``filename`` the journal): the batch was
    not committed, and the coordinator must stop (a restart replays the journal)."""


class JournalStore(Protocol):
    """Durable, append-only history of every transition."""

    async def open(self, term: int) -> JournalHead:
        """Creates the schema if needed, fences later appends by ``term``, returns the head."""
        ...

    @property
    def term(self) -> int:
        """The leadership term the store was opened with (0 before :meth:`open`)."""
        ...

    async def append(
        self, events: Sequence[pb.HistoryEvent], *, hlc_ceiling_ms: int | None = None
    ) -> None:
        """Durably appends a batch in one transaction; all or nothing.

        ``hlc_ceiling_ms``, when given, is stored in the same transaction: the writer promises
        not to hand out HLC readings above it until it has stored a higher one.

        Raises:
            DeposedError: the store's term is no longer current; nothing was written.
        """
        ...

    async def read(
        self, workflow_id: str, after_sequence: int = 0, limit: int = PAGE_SIZE
    ) -> list[pb.HistoryEvent]:
        """A workflow's events with sequence > ``after_sequence``, in order."""
        ...

    def replay(self, batch: int = PAGE_SIZE) -> AsyncIterator[list[pb.HistoryEvent]]:
        """Every event of every workflow still kept, in sequence order, in batches."""
        ...

    def read_outputs(self, sequence: int) -> str | None:
        """``outputs_json`` of the event with this sequence; None when no such event is kept.

        Synchronous on purpose: the pure core reads large outputs back through it (on a miss
        of its cache, :mod:`plait.coordinator.core.outputs`), one indexed read of one event, on
        the caller's thread; it sees every committed append.
        """
        ...

    async def prune(self, workflow_ids: Sequence[str]) -> int:
        """Deletes the events of finished workflows; returns how many rows went."""
        ...

    async def revocations(self) -> dict[str, str]:
        """Revoked worker ids and their records (JSON text), as :meth:`set_revocation` left them."""
        ...

    async def set_revocation(self, worker_id: str, record: str | None) -> None:
        """Durably revokes ``worker_id`` (``record``: JSON text) or reinstates it (``None``).

        Raises:
            DeposedError: the store's term is no longer current; nothing was written.
        """
        ...

    async def close(self) -> None:
        """Flushes and releases the backend."""
        ...


REVOKED_PREFIX = "revoked_worker:"  # meta key of a revoked worker id


class Leadership(Protocol):
    """Who may write the journal: exactly one coordinator per journal at a time."""

    async def campaign(self) -> int:
        """Blocks until this coordinator leads; returns its term (strictly growing)."""
        ...

    async def hold(self) -> None:
        """Renews leadership until it is lost, then returns (the caller must stop)."""
        ...

    async def leader(self) -> str | None:
        """The gRPC address the current leader advertises, if known (for redirects)."""
        ...

    async def resign(self) -> None:
        """Gives leadership up (clean shutdown) so a standby takes over at once."""
        ...

    async def waiting_for(self) -> str | None:
        """Why this process is not the leader, for a standby's log: who holds leadership
        (address, and pid or holder id and term where the store records them). None until a
        campaign attempt has found leadership held (and again once won)."""
        ...

    @property
    def poll_interval(self) -> float:
        """Seconds between a standby's attempts to take leadership."""
        ...


def open_store(url: str, *, lease_ttl: timedelta = timedelta(seconds=30)) -> JournalStore:
    """The store a ``--store`` URL names (``lease_ttl`` bounds how long a write may hold locks)."""
    kind, target = parse_store_url(url)
    if kind == "sqlite":
        from plait.coordinator.journal.sqlite import SqliteJournal

        return SqliteJournal(target)
    from plait.coordinator.journal.postgres import PostgresJournal

    return PostgresJournal(target, hold_limit=lease_ttl / 2)
