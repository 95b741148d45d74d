"""A watch's wait for a lost coordinator to come back (SDK layer: :class:`plait.client.Client`).

:meth:`Client.watch <plait.client.Client.watch>` and ``wait`` take ``reconnect``: once some
coordinator has taken the watch, a stream that breaks with ``UNAVAILABLE`` (a restart, a
failover) is retried here, within a bounded wait, and resumed after the last sequence seen.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import grpc

from plait.clock import Clock

__all__ = ["Outage"]


class Outage:
    """A watch's wait for a lost coordinator to come back (:meth:`Client.watch`,
    ``reconnect``): only once some coordinator took the watch, only while the answer is
    ``UNAVAILABLE``, at most ``reconnect`` seconds from the outage's first failure, with
    jittered pauses (200 ms doubling to 2 s)."""

    def __init__(
        self,
        clock: Clock,
        sleep: Callable[[float], None],
        reconnect: float | None,
        deadline_at: float | None,
    ) -> None:
        # Imported here (as plait.endpoints does): plait.worker's package pulls in the session.
        from plait.worker.backoff import Backoff

        self._clock = clock
        self._sleep = sleep
        self._reconnect = reconnect or 0.0
        self._deadline_at = deadline_at
        self._backoff = Backoff(timedelta(milliseconds=200), timedelta(seconds=2))
        self._until: float | None = None
        self._served = False

    def served(self) -> None:
        """A coordinator took the watch: any outage is over, and a later loss is waited out."""
        self._served = True
        self._until = None
        self._backoff.reset()

    @property
    def was_served(self) -> bool:
        """Some coordinator took this watch (a failure now loses it, rather than never
        reaching one)."""
        return self._served

    def begin(self) -> bool:
        """A failure; True when it starts an outage (the first since the watch was served)."""
        if self._until is not None:
            return False
        self._until = self._clock.monotonic() + self._reconnect
        return True

    def pause(self, err: grpc.RpcError) -> bool:
        """Sleeps before the next try and returns True, or False when this outage is given up."""
        code = err.code()  # type: ignore[attr-defined,unused-ignore]
        now = self._clock.monotonic()
        until = self._until if self._until is not None else now
        delay = min(self._backoff.next_delay(), max(0.0, until - now))
        if (
            not self._reconnect
            or not self._served
            or code != grpc.StatusCode.UNAVAILABLE
            or now >= until
            or (self._deadline_at is not None and now + delay >= self._deadline_at)
        ):
            return False
        self._sleep(delay)
        return True
