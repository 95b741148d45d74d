"""Reconnect backoff: exponential with full jitter (foundation layer: plait.worker).

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") spreads a fleet of workers
that lost the coordinator at the same moment, so they do not all come back in lock-step.
"""

from __future__ import annotations

import random
from datetime import timedelta


class Backoff:
    """Delays ``uniform(0, min(maximum, initial * 2**n))`` for the n-th failure in a row."""

    __slots__ = ("_failures", "_rng", "initial", "maximum")

    def __init__(
        self,
        initial: timedelta = timedelta(milliseconds=200),
        maximum: timedelta = timedelta(seconds=10),
        rng: random.Random | None = None,
    ) -> None:
        if initial <= timedelta(0):
            raise ValueError(f"backoff initial delay must be positive, got {initial}")
        if maximum < initial:
            raise ValueError(f"backoff maximum {maximum} is below its initial delay {initial}")
        self.initial = initial.total_seconds()
        self.maximum = maximum.total_seconds()
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures since the last :meth:`reset`."""
        return self._failures

    def ceiling(self) -> float:
        """The upper bound of the next delay, in seconds."""
        # min() before the power would overflow: cap the exponent.
        return min(self.maximum, self.initial * float(2 ** min(self._failures, 62)))

    def next_delay(self) -> float:
        """Seconds to wait before the next try; each call counts one more failure."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._failures += 1
        return delay

    def reset(self) -> None:
        """Call after a success: the next failure starts from ``initial`` again."""
        self._failures = 0
