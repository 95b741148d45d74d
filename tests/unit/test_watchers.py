"""Watch fan-out: a commit nobody watches costs the publisher nothing, a watched one arrives."""

from __future__ import annotations

import asyncio
from typing import Any

from plait.coordinator.watchers import Watchers
from plait.v1 import workflow_pb2 as pb


class Untouchable:
    """A record that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"publish read {name!r} of a record with no watch open")


class EmptyJournal:
    """A journal with no history; says when a watch has read it (and so is registered)."""

    def __init__(self) -> None:
        self.read_once = asyncio.Event()

    async def read(self, workflow_id: str, after: int, limit: int) -> list[pb.HistoryEvent]:
        self.read_once.set()
        return []


def ev(workflow_id: str, sequence: int) -> pb.HistoryEvent:
    return pb.HistoryEvent(
        workflow_id=workflow_id, sequence=sequence, type=pb.EVENT_TYPE_ACTION_LEASED
    )


def test_no_watch_open_reads_no_record() -> None:
    w = Watchers(EmptyJournal())  # type: ignore[arg-type]
    w.publish([Untouchable(), Untouchable()])  # type: ignore[list-item]
    assert "wf-a" not in w


async def test_only_the_watched_workflow_gets_lists() -> None:
    journal = EmptyJournal()
    w = Watchers(journal)  # type: ignore[arg-type]
    stream = w.watch("wf-a", 0, follow=True)
    first = asyncio.ensure_future(stream.__anext__())
    try:
        await journal.read_once.wait()
        (queue,) = w._by_workflow["wf-a"]
        w.publish([ev("wf-b", 1), ev("wf-c", 2)])
        assert queue.qsize() == 0, "a commit of unwatched workflows made a list"
        w.publish([ev("wf-b", 3), ev("wf-a", 4), ev("wf-c", 5), ev("wf-a", 6)])
        assert queue.qsize() == 1
        got = await asyncio.wait_for(first, 10)
        assert [(e.workflow_id, e.sequence) for e in got] == [("wf-a", 4), ("wf-a", 6)]
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()
    assert "wf-a" not in w
