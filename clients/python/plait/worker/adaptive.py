"""Adaptive concurrency: offer fewer slots while the host is overloaded (foundation layer).

The coordinator only sees ``Credit`` deltas, so a worker can lower the concurrency it offers
without any protocol change: it simply stops handing freed slots back. :class:`AdaptiveCredit`
is the pure core (no I/O, no clock): every interval the session gives it a :class:`LoadReading`
and it moves the offered limit AIMD-style --

* **overloaded** (load per CPU above ``max_load_per_cpu``, ``MemAvailable`` below
  ``min_mem_available`` of ``MemTotal``, or memory PSI ``some avg10`` above
  ``max_memory_stall``): ``limit = max(1, floor(limit * 0.5))``;
* **healthy**: ``limit = min(slots, limit + 1)``.

It also keeps the credit ledger: ``offered = slots - withheld`` is what the coordinator may have
granted (running plus its free credit). A freed slot is credited only while ``offered`` stays at
or under the limit; the rest is withheld, so running attempts drain down to the limit. When the
limit rises, withheld slots are released as extra credit. Readings come from a
:class:`LoadProbe`, so tests drive the decisions without an overloaded machine;
:class:`SystemLoadProbe` reads ``os.getloadavg()``, ``/proc/meminfo`` and
``/proc/pressure/memory``.

:class:`AdaptiveSlots` is what a :class:`~plait.worker.session.WorkerSession` holds: the ledger,
the probe it reads every interval, the counters it keeps in
:class:`~plait.worker.session_config.SessionStats` and the log line of each decision.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from plait.worker.resources import ReadText, meminfo_kib, read_text

if TYPE_CHECKING:
    from plait.worker.session_config import SessionStats

__all__ = [
    "AdaptiveConfig",
    "AdaptiveCredit",
    "AdaptiveSlots",
    "Adjustment",
    "LoadProbe",
    "LoadReading",
    "SystemLoadProbe",
    "parse_psi_some_avg10",
]

# The session's logger: these lines always came from it, and log formats print the name.
session_log = logging.getLogger("plait.worker.session")


@dataclass(frozen=True, slots=True)
class LoadReading:
    """One look at how busy the host is."""

    load_per_cpu: float
    """1-minute load average divided by the CPU count."""
    mem_available: float | None = None
    """``MemAvailable / MemTotal`` (0 to 1), ``None`` when unknown."""
    memory_stall: float | None = None
    """Memory PSI ``some avg10`` (percent of time some task stalled), ``None`` without PSI."""


class LoadProbe(Protocol):
    """Where readings come from (the system, or a test)."""

    def read(self) -> LoadReading:
        """Takes a reading now; must not block for long (it runs on the event loop)."""
        ...


def parse_psi_some_avg10(text: str) -> float | None:
    """``avg10`` of the ``some`` line of a /proc/pressure file, or ``None``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for f in fields[1:]:
                key, _, value = f.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


class SystemLoadProbe:
    """Reads the load average, ``/proc/meminfo`` and memory PSI of this host."""

    def __init__(
        self,
        cpus: float | None = None,
        *,
        read: ReadText = read_text,
        loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
    ) -> None:
        self.cpus = max(cpus or os.cpu_count() or 1, 1e-3)
        self._read = read
        self._loadavg = loadavg

    def read(self) -> LoadReading:
        """The current reading (unknown parts are ``None``)."""
        try:
            load = self._loadavg()[0] / self.cpus
        except OSError:
            load = 0.0
        available: float | None = None
        meminfo = self._read("/proc/meminfo") or ""
        total, avail = meminfo_kib(meminfo, "MemTotal"), meminfo_kib(meminfo, "MemAvailable")
        if total and avail is not None:
            available = avail / total
        psi = self._read("/proc/pressure/memory")
        stall = parse_psi_some_avg10(psi) if psi else None
        return LoadReading(load_per_cpu=load, mem_available=available, memory_stall=stall)


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    """When the worker counts as overloaded, and how often it looks."""

    interval: timedelta = timedelta(seconds=3)
    """How often to take a reading (and move the limit by at most one step)."""
    max_load_per_cpu: float = 1.5
    min_mem_available: float = 0.10
    max_memory_stall: float = 10.0
    """Memory PSI ``some avg10`` percent above which memory counts as under pressure."""

    def __post_init__(self) -> None:
        if self.interval <= timedelta(0):
            raise ValueError("adaptive interval must be positive")

    def overload(self, reading: LoadReading) -> str:
        """Why ``reading`` counts as overloaded, or ``""`` when it is healthy."""
        if reading.load_per_cpu > self.max_load_per_cpu:
            return f"load per CPU {reading.load_per_cpu:.2f} > {self.max_load_per_cpu:g}"
        if reading.mem_available is not None and reading.mem_available < self.min_mem_available:
            return (
                f"MemAvailable {reading.mem_available:.1%} < {self.min_mem_available:.0%}"
                " of MemTotal"
            )
        if reading.memory_stall is not None and reading.memory_stall > self.max_memory_stall:
            return f"memory PSI some avg10 {reading.memory_stall:g}% > {self.max_memory_stall:g}%"
        return ""


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What one reading decided."""

    limit: int
    """The offered limit from now on."""
    release: int
    """Withheld slots to credit now (the limit rose)."""
    overload: str
    """Why the host counts as overloaded, ``""`` when healthy."""


class AdaptiveCredit:
    """The offered limit and the credit ledger (pure; see the module docstring).

    With ``config=None`` the limit stays at ``slots`` and every freed slot is credited.
    """

    __slots__ = ("config", "limit", "slots", "withheld")

    def __init__(self, slots: int, config: AdaptiveConfig | None = None) -> None:
        self.slots = max(1, slots)
        self.config = config
        self.limit = self.slots
        """Slots the worker wants the coordinator to use at most."""
        self.withheld = 0
        """Freed slots not handed back since the last Hello."""

    @property
    def offered(self) -> int:
        """Slots the coordinator may have in use here (running plus its free credit)."""
        return self.slots - self.withheld

    def reset(self) -> None:
        """A new ``Hello``: the coordinator's ledger restarts from all the slots."""
        self.withheld = 0

    def freed(self, slots: int) -> int:
        """Slots an attempt freed; returns how many of them to credit now."""
        keep = min(slots, max(0, self.offered - self.limit))
        self.withheld += keep
        return slots - keep

    def observe(self, reading: LoadReading) -> Adjustment:
        """Moves the limit for one reading; returns it and the credit to release now."""
        if self.config is None:
            return Adjustment(self.limit, 0, "")
        overload = self.config.overload(reading)
        if overload:
            self.limit = max(1, math.floor(self.limit * 0.5))
        else:
            self.limit = min(self.slots, self.limit + 1)
        release = min(self.withheld, max(0, self.limit - self.offered))
        self.withheld -= release
        return Adjustment(self.limit, release, overload)


class AdaptiveSlots:
    """A session's adaptive concurrency: the ledger, its probe, its counters and log lines.

    Without a probe (adaptive concurrency off) the limit stays at ``slots`` and every freed
    slot is credited.
    """

    __slots__ = ("_stats", "credit", "probe")

    def __init__(
        self,
        slots: int,
        config: AdaptiveConfig | None,
        stats: SessionStats,
        probe: LoadProbe | None,
    ) -> None:
        self.credit = AdaptiveCredit(slots, config)
        self.probe = probe
        self._stats = stats
        stats.offered_slots = self.credit.limit

    def reset(self) -> None:
        """A new ``Hello``: nothing is withheld any more."""
        self.credit.reset()
        self._stats.withheld_slots = 0

    def freed(self, slots: int) -> int:
        """Slots an attempt freed; returns how many of them to credit now."""
        credit = self.credit.freed(slots)
        self._stats.withheld_slots = self.credit.withheld
        return credit

    def adapt(self) -> Adjustment:
        """Takes one reading and moves the offered limit; the caller credits ``release``."""
        if self.probe is None:
            return Adjustment(self.credit.limit, 0, "")
        before = self.credit.limit
        adj = self.credit.observe(self.probe.read())
        self._stats.offered_slots = adj.limit
        self._stats.withheld_slots = self.credit.withheld
        if adj.limit < before:
            self._stats.adaptive_decreases += 1
            session_log.info(
                "overloaded (%s): offering %d of %d slot(s), was %d",
                adj.overload,
                adj.limit,
                self.credit.slots,
                before,
            )
        elif adj.limit > before:
            session_log.debug("healthy: offering %d of %d slot(s)", adj.limit, self.credit.slots)
        return adj

    async def run(self, adapt: Callable[[], object]) -> None:
        """Calls ``adapt`` every ``AdaptiveConfig.interval``, forever (a failure is logged)."""
        assert self.credit.config is not None
        interval = self.credit.config.interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                adapt()
            except Exception:
                session_log.exception("adaptive concurrency: reading the load failed")
