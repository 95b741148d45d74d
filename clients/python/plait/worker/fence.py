"""Self-fencing: when a worker must kill its attempts (foundation layer: plait.worker).

Pure bookkeeping, no I/O and no clock reads: times come in as arguments. Each heartbeat's local
monotonic send time is remembered; the ``Ack`` that echoes heartbeat *N* moves the fence deadline
to ``send_time(N) + lease_ttl`` (a ``Welcome`` does the same for the ``Hello`` it answers). The
coordinator may give a lease away once that deadline has passed, so every attempt must be dead by
then: at ``deadline - kill_grace - margin`` the session kills them, connected or not, and once the
deadline itself has passed it drops the stream too. The
:class:`~plait.worker.session.WorkerSession` acts on the :class:`FenceCheck` it gets back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FenceCheck", "SelfFence"]


@dataclass(frozen=True, slots=True)
class FenceCheck:
    """What one look at the fence decided."""

    kill: bool
    """Kill every attempt not already being cancelled: its lease may be lost soon."""
    abort: bool
    """Drop the stream: no heartbeat was acknowledged for a lease TTL."""
    next_check: float
    """Seconds until the fence should be looked at again."""


class SelfFence:
    """The fence deadline, derived from heartbeat send times and the acks that echo them."""

    __slots__ = ("_sent", "deadline")

    def __init__(self) -> None:
        self.deadline = -math.inf
        """Monotonic time by which every attempt must be dead unless a newer ack arrives."""
        self._sent: dict[int, float] = {}

    def heartbeat_sent(self, sequence: int, at: float) -> None:
        """Remembers when heartbeat ``sequence`` was sent (taken before the send)."""
        self._sent[sequence] = at

    def forget_heartbeats(self) -> None:
        """Forgets unacknowledged heartbeats: their stream has ended."""
        self._sent.clear()

    def welcomed(self, hello_sent: float, lease_ttl: float) -> None:
        """A ``Welcome`` answers ``Hello``: adopted leases are renewed no earlier than it left."""
        self.deadline = max(self.deadline, hello_sent + lease_ttl)

    def acked(self, sequence: int, lease_ttl: float) -> None:
        """An ``Ack`` echoed heartbeat ``sequence``: the leases run to its send time + TTL."""
        if not sequence:
            return
        sent = self._sent.get(sequence)
        if sent is not None:
            self.deadline = max(self.deadline, sent + lease_ttl)
            for s in [s for s in self._sent if s <= sequence]:
                del self._sent[s]

    def check(
        self, now: float, *, kill_grace: float, margin: float, heartbeat_interval: float
    ) -> FenceCheck:
        """Decides, at monotonic time ``now``, whether to kill attempts and drop the stream."""
        kill_at = self.deadline - kill_grace - margin
        next_check = min(kill_at - now, heartbeat_interval) if kill_at > now else heartbeat_interval
        return FenceCheck(kill=now >= kill_at, abort=now >= self.deadline, next_check=next_check)
