"""The coordinator's HLC stamps, as a worker takes them (foundation layer: plait.worker).

A worker merges every stamp its coordinator sends, however far ahead of its own wall clock
(docs/protocol.md, "Hybrid logical clocks"): the coordinator orders the history, and a worker
whose clock is behind must still stamp its reports after the leases that caused them. A stamp
beyond ``max_clock_offset`` (``Welcome.max_clock_offset``) means the clocks disagree: it is
counted in ``SessionStats.clock_offset_errors`` and logged at most once a minute.
"""

from __future__ import annotations

import logging
import math

from plait.clock import Clock
from plait.hlc import ClockOffsetError, HlcTimestamp, HybridLogicalClock
from plait.v1 import hlc_pb2
from plait.worker.session_config import SessionStats

log = logging.getLogger("plait.worker.session")
LOG_EVERY = 60.0  # seconds between two warnings about the coordinator's clock


class CoordinatorStamps:
    """Merges the coordinator's stamps into the worker's HLC; warns when they run far ahead."""

    __slots__ = ("_clock", "_hlc", "_last_log", "_logged", "_stats", "_worker_id")

    def __init__(
        self, hlc: HybridLogicalClock, clock: Clock, stats: SessionStats, worker_id: str
    ) -> None:
        self._hlc, self._clock, self._stats, self._worker_id = hlc, clock, stats, worker_id
        self._last_log = -math.inf
        self._logged = 0  # clock_offset_errors when the last warning was written

    def observe(self, stamp: hlc_pb2.HlcTimestamp) -> None:
        """Merges one received stamp (an unset one only advances the clock)."""
        try:
            self._hlc.observe_proto(stamp)
        except ClockOffsetError as err:
            self._hlc.observe(HlcTimestamp(stamp.physical_ms, stamp.logical), bounded=False)
            self._stats.clock_offset_errors += 1
            now = self._clock.monotonic()
            if now - self._last_log < LOG_EVERY:
                return
            self._last_log = now
            total = self._stats.clock_offset_errors
            since, self._logged = total - self._logged, total
            log.warning(
                "the coordinator's clock is %d ms ahead of this worker's (more than"
                " max_clock_offset %d ms): its stamps are merged all the same, so this"
                " worker's reports stay after the leases that caused them; check NTP"
                " (%d such message(s) since the last warning, %d in all; logged at most"
                " once a minute)",
                err.offset_ms,
                self._hlc.max_offset_ms,
                since,
                total,
                extra={"worker_id": self._worker_id},
            )
