"""Properties of the hybrid logical clock (plait.hlc) under any interleaving of events.

Two processes, each with its own hand-moved wall clock, stamp local events, send messages to
each other (in flight, delivered in any order, possibly never) and have their wall clocks jump
both ways. Whatever happens: readings strictly increase per process, a received message is
ordered after its send, and a stamp too far ahead is refused without moving the clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from plait.clock import ManualClock
from plait.hlc import (
    ZERO,
    ClockOffsetError,
    HlcTimestamp,
    HybridLogicalClock,
    from_proto,
    write_proto,
)
from plait.v1 import hlc_pb2

MAX_OFFSET_MS = 500
BASE_WALL_MS = 1_700_000_000_000
PROCESSES = ("a", "b")

wall_jumps = st.integers(min_value=-3_600_000, max_value=3_600_000)
small_steps = st.integers(min_value=0, max_value=2_000)


class HlcMachine(RuleBasedStateMachine):
    """Two HLC processes exchanging messages while their wall clocks wander."""

    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        self.clocks = {p: ManualClock(wall_ms=BASE_WALL_MS) for p in PROCESSES}
        self.hlcs = {p: HybridLogicalClock(self.clocks[p], MAX_OFFSET_MS) for p in PROCESSES}
        self.last: dict[str, HlcTimestamp] = dict.fromkeys(PROCESSES, ZERO)

    def _record(self, proc: str, reading: HlcTimestamp) -> None:
        assert reading > self.last[proc], f"{proc}: {reading} not after {self.last[proc]}"
        assert reading.physical_ms >= self.clocks[proc].wall_ms(), "behind the wall clock"
        self.last[proc] = reading

    @rule(proc=st.sampled_from(PROCESSES))
    def local_event(self, proc: str) -> None:
        self._record(proc, self.hlcs[proc].now())

    @rule(proc=st.sampled_from(PROCESSES), ms=small_steps)
    def time_passes(self, proc: str, ms: int) -> None:
        self.clocks[proc].advance(ms / 1000)

    @rule(proc=st.sampled_from(PROCESSES), delta_ms=wall_jumps)
    def wall_clock_jumps(self, proc: str, delta_ms: int) -> None:
        clock = self.clocks[proc]
        clock.set_wall_ms(clock.wall_ms() + delta_ms)

    @rule(target=messages, sender=st.sampled_from(PROCESSES))
    def send(self, sender: str) -> tuple[str, HlcTimestamp]:
        stamp = self.hlcs[sender].now()
        self._record(sender, stamp)
        return (sender, stamp)

    @rule(message=consumes(messages))
    def receive(self, message: tuple[str, HlcTimestamp]) -> None:
        sender, stamp = message
        receiver = "b" if sender == "a" else "a"
        hlc = self.hlcs[receiver]
        before = hlc.last
        wall = self.clocks[receiver].wall_ms()
        if stamp.physical_ms - wall > MAX_OFFSET_MS:
            with pytest.raises(ClockOffsetError) as info:
                hlc.observe(stamp)
            assert hlc.last == before, "a refused stamp must leave the clock unchanged"
            assert info.value.offset_ms == stamp.physical_ms - wall
            assert info.value.remote == stamp
            return
        merged = hlc.observe(stamp)
        assert merged > stamp, f"receive {merged} not after send {stamp}"
        self._record(receiver, merged)

    @invariant()
    def last_is_what_was_handed_out(self) -> None:
        for proc in PROCESSES:
            assert self.hlcs[proc].last == self.last[proc]


TestHlcInterleavings = HlcMachine.TestCase
TestHlcInterleavings.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


@given(
    steps=st.lists(st.one_of(small_steps.map(lambda ms: ("advance", ms)), wall_jumps), max_size=80)
)
def test_readings_strictly_increase_whatever_the_wall_clock_does(
    steps: list[tuple[str, int] | int],
) -> None:
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock)
    prev = hlc.now()
    for step in steps:
        if isinstance(step, tuple):
            clock.advance(step[1] / 1000)
        else:
            clock.set_wall_ms(clock.wall_ms() + step)
        reading = hlc.now()
        assert reading > prev
        prev = reading


@given(
    ahead_ms=st.integers(min_value=MAX_OFFSET_MS + 1, max_value=10 * 3_600_000),
    logical=st.integers(min_value=0, max_value=2**16),
    local_events=st.integers(min_value=0, max_value=5),
)
def test_stamp_beyond_max_offset_raises_and_leaves_clock_unchanged(
    ahead_ms: int, logical: int, local_events: int
) -> None:
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock, max_offset_ms=MAX_OFFSET_MS)
    for _ in range(local_events):
        hlc.now()
    before = hlc.last
    remote = HlcTimestamp(BASE_WALL_MS + ahead_ms, logical)

    with pytest.raises(ClockOffsetError) as info:
        hlc.observe(remote)

    assert hlc.last == before
    assert info.value.offset_ms == ahead_ms
    assert info.value.max_offset_ms == MAX_OFFSET_MS
    assert f"{ahead_ms} ms ahead" in str(info.value)
    # The clock carries on from where it was, not from the refused stamp.
    assert hlc.now().physical_ms < remote.physical_ms


@given(ahead_ms=st.integers(min_value=0, max_value=MAX_OFFSET_MS), logical=st.integers(0, 1000))
def test_stamp_within_max_offset_is_merged(ahead_ms: int, logical: int) -> None:
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock, max_offset_ms=MAX_OFFSET_MS)
    remote = HlcTimestamp(BASE_WALL_MS + ahead_ms, logical)

    merged = hlc.observe(remote)

    assert merged > remote
    assert hlc.now() > merged


@given(
    floor_ahead_ms=st.integers(min_value=0, max_value=24 * 3_600_000),
    floor_logical=st.integers(min_value=0, max_value=2**20),
)
def test_floor_starts_a_new_clock_above_a_prior_stamp_even_with_wall_clock_behind(
    floor_ahead_ms: int, floor_logical: int
) -> None:
    # A standby whose wall clock is behind its predecessor's last journal stamp.
    prior = HlcTimestamp(BASE_WALL_MS + floor_ahead_ms, floor_logical)
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock, floor=prior)

    first = hlc.now()
    assert first > prior
    clock.advance(0.001)
    assert hlc.now() > first


def test_floor_below_wall_clock_lets_physical_time_lead() -> None:
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock, floor=HlcTimestamp(BASE_WALL_MS - 10_000, 7))

    assert hlc.now() == HlcTimestamp(BASE_WALL_MS, 0)


def test_observe_proto_skips_unset_stamp_and_stamp_writes_reading() -> None:
    clock = ManualClock(wall_ms=BASE_WALL_MS)
    hlc = HybridLogicalClock(clock)
    unset = hlc_pb2.HlcTimestamp()

    reading = hlc.observe_proto(unset)
    assert reading == HlcTimestamp(BASE_WALL_MS, 0)

    msg = hlc_pb2.HlcTimestamp()
    stamped = hlc.stamp(msg)
    assert from_proto(msg) == stamped == HlcTimestamp(BASE_WALL_MS, 1)

    out = hlc_pb2.HlcTimestamp()
    write_proto(HlcTimestamp(5, 6), out)
    assert (out.physical_ms, out.logical) == (5, 6)
    assert str(HlcTimestamp(5, 6)) == "5.0006"
