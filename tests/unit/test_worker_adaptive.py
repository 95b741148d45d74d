"""Adaptive concurrency: AIMD decisions and the credit ledger, driven by injected readings."""

from __future__ import annotations

from datetime import timedelta

import pytest

from plait.worker.adaptive import (
    AdaptiveConfig,
    AdaptiveCredit,
    LoadReading,
    SystemLoadProbe,
    parse_psi_some_avg10,
)

HEALTHY = LoadReading(load_per_cpu=0.5, mem_available=0.5, memory_stall=0.0)
BUSY = LoadReading(load_per_cpu=2.0, mem_available=0.5)
LOW_MEMORY = LoadReading(load_per_cpu=0.1, mem_available=0.05)
STALLED = LoadReading(load_per_cpu=0.1, mem_available=0.5, memory_stall=25.0)


def test_overload_reasons() -> None:
    cfg = AdaptiveConfig()
    assert cfg.overload(HEALTHY) == ""
    assert "load per CPU 2.00 > 1.5" in cfg.overload(BUSY)
    assert "MemAvailable 5.0% < 10%" in cfg.overload(LOW_MEMORY)
    assert "memory PSI" in cfg.overload(STALLED)
    # Exactly at the thresholds is still healthy.
    assert cfg.overload(LoadReading(load_per_cpu=1.5, mem_available=0.10)) == ""
    # Unknown memory readings never count as pressure.
    assert cfg.overload(LoadReading(load_per_cpu=0.0)) == ""
    with pytest.raises(ValueError, match="interval"):
        AdaptiveConfig(interval=timedelta(0))


@pytest.mark.parametrize("reading", [BUSY, LOW_MEMORY, STALLED])
def test_overload_halves_down_to_one(reading: LoadReading) -> None:
    c = AdaptiveCredit(8, AdaptiveConfig())
    limits = [c.observe(reading).limit for _ in range(5)]
    assert limits == [4, 2, 1, 1, 1]  # never below 1
    c = AdaptiveCredit(7, AdaptiveConfig())
    assert [c.observe(reading).limit for _ in range(3)] == [3, 1, 1]


def test_recovery_adds_one_per_reading_up_to_slots() -> None:
    c = AdaptiveCredit(4, AdaptiveConfig())
    c.observe(BUSY)
    c.observe(BUSY)
    assert c.limit == 1
    assert [c.observe(HEALTHY).limit for _ in range(5)] == [2, 3, 4, 4, 4]  # never above slots


def test_freed_slots_are_withheld_until_running_is_under_the_limit() -> None:
    # 8 slots, all offered and running; the host becomes overloaded.
    c = AdaptiveCredit(8, AdaptiveConfig())
    adj = c.observe(BUSY)
    assert (adj.limit, adj.release, c.offered) == (4, 0, 8)  # credit already given stays given
    # The first four freed slots are withheld; after that, freed slots are credited again.
    assert [c.freed(1) for _ in range(4)] == [0, 0, 0, 0]
    assert (c.offered, c.withheld) == (4, 4)
    assert c.freed(1) == 1
    # A multi-slot attempt splits: part withheld, part credited.
    c2 = AdaptiveCredit(8, AdaptiveConfig())
    c2.observe(BUSY)
    assert c2.freed(3) == 0 and c2.freed(3) == 2 and c2.withheld == 4


def test_recovery_releases_withheld_credit_one_step_at_a_time() -> None:
    c = AdaptiveCredit(4, AdaptiveConfig())
    c.observe(BUSY)  # limit 2
    assert c.freed(1) == 0 and c.freed(1) == 0 and c.withheld == 2
    adj = c.observe(HEALTHY)
    assert (adj.limit, adj.release, c.withheld, c.offered) == (3, 1, 1, 3)
    adj = c.observe(HEALTHY)
    assert (adj.limit, adj.release, c.withheld, c.offered) == (4, 1, 0, 4)
    adj = c.observe(HEALTHY)
    assert (adj.limit, adj.release) == (4, 0)  # nothing left to release, nothing invented


def test_a_new_hello_restarts_the_ledger_but_keeps_the_limit() -> None:
    c = AdaptiveCredit(4, AdaptiveConfig())
    c.observe(BUSY)
    c.freed(2)
    assert c.withheld == 2
    c.reset()
    assert (c.withheld, c.offered, c.limit) == (0, 4, 2)
    assert c.freed(1) == 0  # back down to the limit again


def test_without_adaptive_every_freed_slot_is_credited() -> None:
    c = AdaptiveCredit(4)
    assert c.observe(BUSY) == c.observe(HEALTHY)
    assert c.limit == 4
    assert [c.freed(1) for _ in range(4)] == [1, 1, 1, 1]


def test_psi_parsing() -> None:
    text = (
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
        "full avg10=1.00 avg60=0.50 avg300=0.10 total=45\n"
    )
    assert parse_psi_some_avg10(text) == 12.5
    assert parse_psi_some_avg10("full avg10=1.00\n") is None
    assert parse_psi_some_avg10("some avg10=x\n") is None


def test_system_probe_reads_injected_proc_files() -> None:
    table = {
        "/proc/meminfo": "MemTotal: 1000 kB\nMemAvailable: 50 kB\n",
        "/proc/pressure/memory": "some avg10=7.00 avg60=0 avg300=0 total=0\n",
    }
    probe = SystemLoadProbe(4, read=table.get, loadavg=lambda: (6.0, 1.0, 1.0))
    assert probe.read() == LoadReading(load_per_cpu=1.5, mem_available=0.05, memory_stall=7.0)
    bare = SystemLoadProbe(2, read={}.get, loadavg=lambda: (1.0, 0.0, 0.0))
    assert bare.read() == LoadReading(load_per_cpu=0.5)
    real = SystemLoadProbe().read()
    assert real.load_per_cpu >= 0
