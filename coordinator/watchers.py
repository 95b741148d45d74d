"""Watchers of workflow histories: the journal first, then what each commit adds (edge layer).

A watch reads the history after a sequence from the journal in pages, then follows the events
the runtime publishes after each commit, one list per workflow and commit. A watcher that falls
more than ``QUEUE_LIMIT`` commits behind has its stream ended; it may resume by sequence.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from operator import attrgetter

from plait.coordinator.journal.store import JournalStore
from plait.errors import UnavailableError
from plait.v1 import workflow_pb2 as pb

E = pb  # EVENT_TYPE_* constants
QUEUE_LIMIT = 10_000  # commits a watcher may fall behind before its stream ends
BATCH_BYTES = 1 << 20  # replayed history is sent in batches of about this size
PAGE = 5000  # events read from the journal at a time
# The most one event may be in a watch: the message limit (4 MiB) less room for the response.
EVENT_BYTES = 4 * 1024 * 1024 - 64 * 1024

Queue = asyncio.Queue[list[pb.HistoryEvent] | None]
_WORKFLOW_ID = attrgetter("workflow_id")


class Watchers:
    """Every open watch, by workflow."""

    def __init__(self, store: JournalStore) -> None:
        self.store = store
        self._by_workflow: dict[str, set[Queue]] = defaultdict(set)

    def __contains__(self, workflow_id: object) -> bool:
        """Whether someone watches ``workflow_id`` (retention keeps such workflows)."""
        return workflow_id in self._by_workflow

    async def watch(
        self, workflow_id: str, after: int, follow: bool
    ) -> AsyncIterator[list[pb.HistoryEvent]]:
        """The history after ``after`` from the journal, then (``follow``) live events."""
        q: Queue = asyncio.Queue(QUEUE_LIMIT)
        self._by_workflow[workflow_id].add(q)
        try:
            last = after
            finished = False
            while True:
                page = await self.store.read(workflow_id, last, PAGE)
                for batch in by_size(page):
                    yield batch
                if page:
                    last = page[-1].sequence
                    finished = page[-1].type == E.EVENT_TYPE_WORKFLOW_FINISHED
                if len(page) < PAGE:
                    break
            if not follow or finished:
                return
            while True:
                events = await q.get()
                if events is None:
                    raise UnavailableError(
                        f"watch of {workflow_id} ended (coordinator stopping or watcher too slow);"
                        f" resume after sequence {last}"
                    )
                fresh = [fitted(ev) for ev in events if ev.sequence > last]
                if not fresh:
                    continue
                last = fresh[-1].sequence
                yield fresh
                if fresh[-1].type == E.EVENT_TYPE_WORKFLOW_FINISHED:
                    return
        finally:
            qs = self._by_workflow.get(workflow_id)
            if qs is not None:
                qs.discard(q)
                if not qs:
                    del self._by_workflow[workflow_id]

    def publish(self, records: list[pb.HistoryEvent]) -> None:
        """Hands each watched workflow its new events (one list per workflow and commit).

        Called after every commit: with no watch open it returns at once, and when none of the
        commit's workflows is watched it only reads their ids (in C); no list or message is
        made for a workflow nobody watches.
        """
        watched = self._by_workflow
        if not watched or not records:
            return
        ids = list(map(_WORKFLOW_ID, records))
        if watched.keys().isdisjoint(ids):
            return
        per_workflow: dict[str, list[pb.HistoryEvent]] = {}
        for workflow_id, ev in zip(ids, records, strict=True):
            if workflow_id in watched:
                per_workflow.setdefault(workflow_id, []).append(ev)
        for workflow_id, events in per_workflow.items():
            qs = watched[workflow_id]
            for q in list(qs):
                try:
                    q.put_nowait(events)
                except asyncio.QueueFull:  # too slow: end its stream, it may resume by sequence
                    qs.discard(q)
                    q._queue.clear()  # type: ignore[attr-defined]
                    q.put_nowait(None)

    def close(self) -> None:
        """Ends every watch (the coordinator is stopping)."""
        for qs in self._by_workflow.values():
            for q in qs:
                q.put_nowait(None)


def fitted(ev: pb.HistoryEvent) -> pb.HistoryEvent:
    """``ev``, or, for a WORKFLOW_SUBMITTED event too large for one message (its spec came in
    pieces: SubmitWorkflowStream), a copy without the spec, so the watch can carry it."""
    if ev.type != E.EVENT_TYPE_WORKFLOW_SUBMITTED or ev.ByteSize() <= EVENT_BYTES:
        return ev
    out = pb.HistoryEvent()
    out.CopyFrom(ev)
    out.ClearField("spec")
    return out


def by_size(events: list[pb.HistoryEvent]) -> list[list[pb.HistoryEvent]]:
    """Splits replayed events into batches of about 1 MiB (under the 4 MiB message limit)."""
    out: list[list[pb.HistoryEvent]] = []
    batch: list[pb.HistoryEvent] = []
    size = 0
    for ev in map(fitted, events):
        n = ev.ByteSize()
        if batch and size + n > BATCH_BYTES:
            out.append(batch)
            batch, size = [], 0
        batch.append(ev)
        size += n
    if batch:
        out.append(batch)
    return out
