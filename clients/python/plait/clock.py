"""The one place Plait reads time (foundation layer).

Everything else gets a :class:`Clock` injected, so tests move time by hand instead of sleeping,
and a worker's wall clock can be skewed on purpose (``PLAIT_CLOCK_OFFSET``) to prove that no
timeout depends on it. Wall time is only for HLC physical components and for display; every
duration (lease TTL, timeouts, backoff) is measured on the monotonic clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """A source of wall and monotonic time."""

    def wall_ms(self) -> int:
        """Unix time in milliseconds (may jump; never use it for durations)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences mean anything."""
        ...


class SystemClock:
    """The real clocks, with an optional wall-clock offset for skew tests."""

    __slots__ = ("offset_ms",)

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock tests move by hand."""

    __slots__ = ("_mono", "_wall_ms")

    def __init__(self, wall_ms: int = 1_700_000_000_000, monotonic: float = 1000.0) -> None:
        self._wall_ms = wall_ms
        self._mono = monotonic

    def wall_ms(self) -> int:
        return self._wall_ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Moves both clocks forward."""
        self._mono += seconds
        self._wall_ms += int(seconds * 1000)

    def set_wall_ms(self, wall_ms: int) -> None:
        """Jumps the wall clock only (as NTP might), leaving monotonic time alone."""
        self._wall_ms = wall_ms


def wall_datetime(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime, for display."""
    return datetime.fromtimestamp(clock.wall_ms() / 1000, tz=UTC)
