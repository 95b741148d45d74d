"""Hybrid logical clocks (Kulkarni et al., 2014) — foundation layer.

Every Plait process keeps one :class:`HybridLogicalClock`. It stamps each message it sends with
:meth:`HybridLogicalClock.now` and merges each stamp it receives with
:meth:`HybridLogicalClock.observe`. Readings never go backwards and respect causality:
if event *a* happened before *b* (same process, or *a* sent a message that *b* received), then
``hlc(a) < hlc(b)``, whatever the hosts' wall clocks say.

A remote reading further ahead than ``max_offset_ms`` of our wall clock is not merged — merging
it would drag every later timestamp into the future — and :class:`ClockOffsetError` says by how
much it was ahead, so the caller can count and log it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from plait.clock import Clock


class HlcTimestamp(NamedTuple):
    """One HLC reading; tuples order exactly as HLC readings do."""

    physical_ms: int
    logical: int

    def __str__(self) -> str:
        return f"{self.physical_ms}.{self.logical:04d}"


ZERO = HlcTimestamp(0, 0)


class _HlcMessage(Protocol):
    physical_ms: int
    logical: int


class ClockOffsetError(Exception):
    """A remote HLC reading was too far ahead of our wall clock to merge."""

    def __init__(self, remote: HlcTimestamp, local_wall_ms: int, max_offset_ms: int) -> None:
        self.remote = remote
        self.offset_ms = remote.physical_ms - local_wall_ms
        self.max_offset_ms = max_offset_ms
        super().__init__(
            f"remote clock is {self.offset_ms} ms ahead (max_clock_offset {max_offset_ms} ms);"
            " not merged"
        )


class HybridLogicalClock:
    """A hybrid logical clock over an injected wall clock."""

    __slots__ = ("_c", "_clock", "_l", "max_offset_ms")

    def __init__(self, clock: Clock, max_offset_ms: int = 500, floor: HlcTimestamp = ZERO) -> None:
        self._clock = clock
        self.max_offset_ms = max_offset_ms
        # `floor` lets a restarted (or newly elected) coordinator start above the journal's
        # last stamp even when its wall clock is behind its predecessor's.
        self._l, self._c = floor

    @property
    def last(self) -> HlcTimestamp:
        """The latest reading handed out or merged, without advancing."""
        return HlcTimestamp(self._l, self._c)

    def now(self) -> HlcTimestamp:
        """Advances for a local or send event and returns the new reading."""
        pt = self._clock.wall_ms()
        if pt > self._l:
            self._l, self._c = pt, 0
        else:
            self._c += 1
        return HlcTimestamp(self._l, self._c)

    def observe(self, remote: HlcTimestamp, *, bounded: bool = True) -> HlcTimestamp:
        """Merges a received reading and returns the new local reading.

        ``bounded=False`` merges a reading however far ahead it is (a worker merging its
        coordinator's stamps: the coordinator orders the history, so a worker whose clock is
        behind must still stamp its reports after the lease that caused them).

        Raises:
            ClockOffsetError: ``bounded`` and the remote reading is more than ``max_offset_ms``
                ahead of our wall clock; nothing was merged.
        """
        pt = self._clock.wall_ms()
        rl, rc = remote
        if bounded and rl - pt > self.max_offset_ms:
            raise ClockOffsetError(remote, pt, self.max_offset_ms)
        l_old = self._l
        l_new = max(l_old, rl, pt)
        if l_new == l_old and l_new == rl:
            self._c = max(self._c, rc) + 1
        elif l_new == l_old:
            self._c += 1
        elif l_new == rl:
            self._c = rc + 1
        else:
            self._c = 0
        self._l = l_new
        return HlcTimestamp(self._l, self._c)

    def observe_proto(self, msg: _HlcMessage) -> HlcTimestamp:
        """:meth:`observe` for a ``plait.v1.HlcTimestamp`` message; an unset stamp is skipped."""
        if msg.physical_ms == 0:
            return self.now()
        return self.observe(HlcTimestamp(msg.physical_ms, msg.logical))

    def stamp(self, msg: _HlcMessage) -> HlcTimestamp:
        """Advances (:meth:`now`) and writes the reading into a ``plait.v1.HlcTimestamp``."""
        ts = self.now()
        msg.physical_ms, msg.logical = ts
        return ts


def from_proto(msg: _HlcMessage) -> HlcTimestamp:
    """Converts a ``plait.v1.HlcTimestamp`` message."""
    return HlcTimestamp(msg.physical_ms, msg.logical)


def write_proto(ts: HlcTimestamp, msg: _HlcMessage) -> None:
    """Writes a reading into a ``plait.v1.HlcTimestamp`` message in place."""
    msg.physical_ms, msg.logical = ts
