"""The Leadership contract, run against every backend, plus what only a lease row can do.

Timings use a 1 s TTL: a PostgreSQL standby polls every TTL/5 and the leader renews every TTL/3.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import psycopg

from plait.clock import ManualClock
from tests.contract.conftest import TTL, Backend

TTL_S = TTL.total_seconds()


async def _done_within(aw: Awaitable[object] | asyncio.Task[object], seconds: float) -> float:
    """Awaits ``aw``, failing if it takes longer than ``seconds``; returns how long it took."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        await aw
    return time.monotonic() - started


class _CountingClock(ManualClock):
    """A frozen (skewed) clock that counts its monotonic reads: a campaign reads once a poll."""

    def __init__(self, wall_ms: int, monotonic: float) -> None:
        super().__init__(wall_ms=wall_ms, monotonic=monotonic)
        self.reads = 0
        self.read = asyncio.Event()

    def monotonic(self) -> float:
        self.reads += 1
        self.read.set()
        return super().monotonic()


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_only_one_of_two_campaigners_wins(backend: Backend) -> None:
    (a, a_polls), (b, b_polls) = backend.candidate("a"), backend.candidate("b")
    campaigns = {asyncio.create_task(a.campaign()): a, asyncio.create_task(b.campaign()): b}
    done, pending = await asyncio.wait(campaigns, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "exactly one campaign must win at once"
    (won,), (waiting,) = done, pending
    winner = campaigns[won]
    polls = b_polls if winner is a else a_polls
    holding = asyncio.create_task(winner.hold())
    try:
        # The winner keeps renewing: the other loses every poll it makes over two TTLs (on a
        # lease row, one that is not renewed lapses after one).
        await polls.reach(polls.count + polls.spanning(2 * TTL_S), waiting, holding)
        assert not waiting.done(), "the standby won while the leader held"
        assert not holding.done()
    finally:
        await _cancel(holding)
        await _cancel(waiting)


async def test_terms_strictly_grow(backend: Backend) -> None:
    a, b = backend.leadership("a"), backend.leadership("b")
    terms = []
    for lead in (a, b, a, b):
        terms.append(await asyncio.wait_for(lead.campaign(), 5))
        await lead.resign()
    assert terms == sorted(set(terms)), terms
    assert terms[0] >= 1


async def test_resign_hands_over_at_once(backend: Backend) -> None:
    a = backend.leadership("a")
    b, polls = backend.candidate("b")
    first = await a.campaign()
    standby = asyncio.create_task(b.campaign())
    await polls.reach(2, standby)  # it campaigns, and loses, while a leads
    assert not standby.done()

    await a.resign()

    # A standby notices at its next poll (TTL/5 for PostgreSQL), far inside one TTL.
    assert await _done_within(standby, TTL_S * 0.6) < TTL_S * 0.6
    assert standby.result() > first


async def test_a_standby_takes_over_when_the_leader_dies(backend: Backend) -> None:
    a = backend.leadership("a")
    b, polls = backend.candidate("b")
    first = await a.campaign()
    holding = asyncio.create_task(a.hold())
    standby = asyncio.create_task(b.campaign())
    await polls.reach(polls.spanning(1.5 * TTL_S), standby, holding)
    assert not standby.done(), "a renewed lease must not be taken"
    assert not holding.done()

    await _cancel(holding)  # the leader stops renewing ...
    await backend.die(a)  # ... and its process is gone, without resigning

    took = await _done_within(standby, 2 * TTL_S + 1)
    assert standby.result() > first
    # At most one TTL of lease left, plus one poll.
    assert took <= TTL_S * 1.2 + 0.3
    print(f"\n[{backend.name}] standby won {took * 1000:.0f} ms after the leader stopped renewing")


async def test_leader_names_the_advertised_address(backend: Backend) -> None:
    a, b = backend.leadership("a"), backend.leadership("b")
    assert await b.leader() is None
    await a.campaign()
    assert await a.leader() == "a:7450"
    assert await b.leader() == "a:7450"
    await a.resign()
    assert await b.leader() is None


async def test_hold_returns_when_resigned(backend: Backend) -> None:
    a = backend.leadership("a")
    await a.campaign()
    holding = asyncio.create_task(a.hold())
    await asyncio.sleep(0.1)
    await a.resign()
    await _done_within(holding, TTL_S)


# ---- only a lease row can lapse under a live process ------------------------------------


async def test_hold_returns_when_another_holder_took_the_row(postgres: Backend) -> None:
    # A frozen monotonic clock: the local deadline never passes, so only the row can tell.
    a = postgres.leadership("a", clock=ManualClock())
    b = postgres.leadership("b")
    first = await a.campaign()
    # A pause (GC, SIGSTOP) longer than the TTL: nothing renews, and b is elected.
    second = await asyncio.wait_for(b.campaign(), 3 * TTL_S)
    assert second > first

    # a's first renewal after the pause touches no row.
    await _done_within(a.hold(), TTL_S)
    assert await a.leader() == "b:7450"


async def test_hold_gives_up_after_a_ttl_without_renewal(postgres: Backend) -> None:
    a = postgres.leadership("a")
    await a.campaign()
    holding = asyncio.create_task(a.hold())
    await asyncio.sleep(TTL_S / 2)
    # The database stops answering a's renewals (they queue behind this row lock).
    async with await psycopg.AsyncConnection.connect(postgres.url) as blocker:
        await blocker.execute("SELECT * FROM plait_leader WHERE id = 1 FOR UPDATE")
        # On its own monotonic clock a concedes within one TTL of its last renewal.
        await _done_within(holding, TTL_S + 0.2)
        await blocker.rollback()


async def test_expiry_is_judged_by_the_database_clock(postgres: Backend) -> None:
    # A standby whose own clocks are far off still waits exactly for the lease to lapse.
    a = postgres.leadership("a")
    clock = _CountingClock(wall_ms=0, monotonic=0.0)
    skewed = postgres.leadership("b", clock=clock)
    await a.campaign()
    standby = asyncio.create_task(skewed.campaign())
    # The third read starts a third poll: two have asked the database and lost.
    async with asyncio.timeout(TTL_S):
        while clock.reads < 3:
            clock.read.clear()
            await clock.read.wait()
    assert not standby.done(), "the lease has not lapsed on the database's clock"
    await _done_within(standby, TTL_S)
    assert await skewed.leader() == "b:7450"
