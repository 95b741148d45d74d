"""How a worker session introduces itself, and what it counts (foundation layer: plait.worker).

:class:`SessionConfig` is the worker's side of ``Hello`` plus its reconnect and close timing and
its credentials (TLS files, bearer token); protocol timing (heartbeat interval, lease TTL, kill
grace) comes from the coordinator's ``Welcome``. :class:`SessionStats` are the counters a
:class:`~plait.worker.session.WorkerSession` increments for its caller to export.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from plait import __version__
from plait.endpoints import parse_targets
from plait.ids import ID_RE, describe_id
from plait.security import TlsFiles, check_token_transport
from plait.worker.adaptive import AdaptiveConfig
from plait.worker.resources import RESOURCE_NAME_RE

__all__ = ["DEFAULT_AGENT", "WORKER_ID_RE", "SessionConfig", "SessionStats"]

# The characters and length of an id (plait.ids); ``describe_id`` also refuses ``..``.
WORKER_ID_RE = ID_RE
DEFAULT_AGENT = f"plait-python/{__version__}"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How a worker introduces itself and (re)connects. Timing comes from the coordinator."""

    worker_id: str
    coordinator: str = "127.0.0.1:7450"
    """``HOST:PORT`` of the coordinator, or of a leader and its standbys, comma-separated."""
    slots: int = 0
    """Total slots; 0 means ``os.cpu_count()``."""
    labels: Mapping[str, str] = field(default_factory=dict)
    agent: str = DEFAULT_AGENT
    hostname: str = field(default_factory=socket.gethostname)
    reconnect_initial: timedelta = timedelta(milliseconds=200)
    reconnect_max: timedelta = timedelta(seconds=10)
    # A coordinator that accepts the stream but never welcomes us (paused, or a stale leader
    # hint) is given up on quickly so the worker moves to the next address.
    welcome_timeout: timedelta = timedelta(seconds=3)
    """How long to wait for the ``Welcome`` after sending ``Hello``."""
    close_timeout: timedelta = timedelta(seconds=5)
    """How long to wait for the coordinator to end the stream after ``Goodbye``."""
    fence_margin: timedelta | None = None
    """Extra head start for self-fencing; ``None`` means one heartbeat interval."""
    max_message_bytes: int = 4 << 20
    prefetch: int = 32
    """``Hello.prefetch``: slots' worth of leases this worker takes beyond its free slots and
    queues, starting each as a slot frees (the coordinator grants at most its own limit, and
    adapts how many to the actions' run times); 0: none."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """``Hello.resources`` exactly as sent (e.g. ``{"cpu": 8, "memory_mb": 32000}``)."""
    adaptive: AdaptiveConfig | None = None
    """Adaptive concurrency (:mod:`plait.worker.adaptive`); ``None`` offers every slot always."""
    progress_interval: timedelta = timedelta(milliseconds=500)
    """At most one ``ActionProgress`` leaves per this interval (latest details per lease)."""
    tls: TlsFiles | None = None
    """TLS to the coordinator (a client certificate proves the worker's identity); ``None``:
    plaintext."""
    token: str = field(default="", repr=False)  # a secret: kept out of reprs and logs
    """Bearer token sent as ``authorization`` metadata on every ``Connect``; empty: none."""

    def __post_init__(self) -> None:
        why = describe_id(self.worker_id)  # the coordinator's rule: it refuses any other id
        if why is not None:
            raise ValueError(f"worker_id {self.worker_id!r}: {why}")
        if not 0 <= self.prefetch <= 10_000:
            raise ValueError(f"prefetch must be between 0 and 10000, got {self.prefetch}")
        if self.slots < 0:
            raise ValueError(f"slots must be >= 1 (or 0 for the CPU count), got {self.slots}")
        addresses = parse_targets(self.coordinator, "coordinator")  # TargetError: ValueError
        # ConfigError: a token must not travel in plaintext beyond loopback.
        check_token_transport(addresses, self.tls, self.token)
        for name, amount in self.resources.items():
            if not RESOURCE_NAME_RE.fullmatch(name):
                raise ValueError(
                    f"resource name {name!r}: a letter, then up to 62 of [A-Za-z0-9_.-]"
                )
            if not amount >= 0 or amount == float("inf"):
                raise ValueError(f"resource {name}: must be a finite number >= 0, got {amount}")

    @property
    def effective_slots(self) -> int:
        """``slots``, or the CPU count when it is 0."""
        return self.slots or os.cpu_count() or 1


@dataclass(slots=True)
class SessionStats:
    """Counters a caller may export; the session only increments them."""

    connects: int = 0
    heartbeats_sent: int = 0
    results_sent: int = 0
    results_acked: int = 0
    results_refused: int = 0
    over_grants: int = 0
    self_fenced: int = 0
    """Attempts killed by self-fencing."""
    self_fences: int = 0
    """Times the session self-fenced (killed its attempts because no ack came in time)."""
    clock_offset_errors: int = 0
    offered_slots: int = 0
    """Gauge: the offered limit (``slots`` unless adaptive concurrency lowered it)."""
    withheld_slots: int = 0
    """Gauge: freed slots not credited back because the limit is below what was offered."""
    adaptive_decreases: int = 0
    progress_sent: int = 0
    """Progress reports (one per lease per flush) sent."""
