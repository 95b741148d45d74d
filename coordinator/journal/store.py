"""The journal's storage contract (edge layer).

The coordinator is the journal's single writer. Events are appended in batches (one
transaction per batch: group commit) in strictly increasing ``sequence``; an append returns
only once the batch is durable. Readers fetch a workflow's history by sequence. Backends:
SQLite (embedded default, :mod:`.sqlite`); PostgreSQL implements the same protocol later, and
one contract test suite runs against every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from plait.hlc import ZERO, HlcTimestamp
from plait.v1 import workflow_pb2 as pb


@dataclass(frozen=True, slots=True)
class JournalHead:
    """Where the journal ends: the next writer continues above both numbers."""

    last_sequence: int = 0
    last_hlc: HlcTimestamp = ZERO


class JournalStore(Protocol):
    """Durable, append-only history of every transition."""

    async def open(self) -> JournalHead:
        """Creates the schema if needed and returns the head of the journal."""
        ...

    async def append(self, events: Sequence[pb.HistoryEvent]) -> None:
        """Durably appends a batch in one transaction; all or nothing."""
        ...

    async def read(
        self, workflow_id: str, after_sequence: int = 0, limit: int = 10_000
    ) -> list[pb.HistoryEvent]:
        """A workflow's events with sequence > ``after_sequence``, in order."""
        ...

    async def close(self) -> None:
        """Flushes and releases the backend."""
        ...


def open_store(url: str) -> JournalStore:
    """The store a ``--store`` URL names."""
    if url.startswith("sqlite:///"):
        from plait.coordinator.journal.sqlite import SqliteJournal

        return SqliteJournal(url.removeprefix("sqlite:///"))
    raise ValueError(f"unsupported store {url!r}: expected sqlite:///PATH")
