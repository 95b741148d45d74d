"""Which coordinator a worker dials next (foundation layer: plait.worker).

A worker may be given several coordinator addresses (a leader and its warm standbys,
comma-separated). :class:`CoordinatorLinks` keeps one ``grpc.aio`` channel per address and,
after each stream ends, decides where and when to dial again:

* a standby's ``NOT_LEADER`` refusal that names the leader is followed **at once**, with no
  backoff (a few times in a row at most, so two standbys with stale hints cannot spin);
* anything else (an unreachable address, a dropped stream, a standby that knows no leader yet)
  moves to the next address after the session's full-jitter backoff.

Everything else about reconnecting -- ``Hello.running`` re-adoption, re-sending unacked
results, the self-fencing clock -- is the session's and does not depend on which address
answered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from plait.endpoints import Endpoints, not_leader_of
from plait.v1 import worker_service_pb2_grpc as pb_grpc
from plait.worker.backoff import Backoff

__all__ = ["CoordinatorLinks"]

log = logging.getLogger(__name__)


class CoordinatorLinks:
    """The worker's channels to each coordinator address, and the choice of the next one."""

    __slots__ = ("_backoff", "_channels", "_options", "_redirects", "endpoints")

    def __init__(
        self, coordinator: str, backoff: Backoff, options: Sequence[tuple[str, int]] = ()
    ) -> None:
        self.endpoints = Endpoints(coordinator, field="coordinator")
        self._backoff = backoff
        self._options = list(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._redirects = 0

    @property
    def address(self) -> str:
        """The address the next stream goes to."""
        return self.endpoints.current

    def stub(self) -> pb_grpc.WorkerServiceStub:
        """A stub on the current address's channel (opened on first use, then kept)."""
        address = self.endpoints.current
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return pb_grpc.WorkerServiceStub(channel)

    def connected(self) -> None:
        """A coordinator welcomed the worker: redirects start counting afresh."""
        self._redirects = 0

    def next_delay(self, err: BaseException | None) -> float:
        """After a stream ended (``err``: why, if it failed): moves on; seconds to wait first."""
        standby = not_leader_of(err) if err is not None else None
        leader = standby.leader if standby is not None else None
        was = self.endpoints.current
        # A leader is followed at once, but only a few times in a row: hints that keep naming
        # coordinators which refuse us are stale, and then the backoff applies.
        if (
            leader
            and leader != was
            and self._redirects <= len(self.endpoints)
            and self.endpoints.follow(leader)
        ):
            self._redirects += 1
            log.info("coordinator at %s is a standby; following the leader at %s", was, leader)
            return 0.0
        if len(self.endpoints) > 1 or was not in self.endpoints.addresses:
            self.endpoints.rotate()
        return self._backoff.next_delay()

    async def close(self) -> None:
        """Closes every channel."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
