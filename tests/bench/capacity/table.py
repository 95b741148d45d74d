"""The capacity runner's table: the arithmetic it scales by, its rows, the machine, the print.

Pure but for ``machine`` and ``loadavg`` (which read /proc and git) and the printing; the
arithmetic is what tests/unit/test_bench_capacity.py checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.system.harness import ROOT


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- the arithmetic (pure; tests/unit/test_bench_capacity.py) --------------------------------


def per_million(total: float, count: int) -> float:
    """``total`` (bytes, seconds) scaled from ``count`` things to a million of them."""
    return total / count * 1_000_000


def share_of_core(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over wall seconds, in % of one core."""
    return 100.0 * cpu_s / wall_s


def workers_per_core(cpu_s_per_heartbeat: float, interval_s: float) -> float:
    """Idle workers one core keeps connected when each heartbeat, every ``interval_s``, costs
    ``cpu_s_per_heartbeat``."""
    return interval_s / cpu_s_per_heartbeat


def needed_share(actions_per_s: float, cpu_s_per_action: float) -> float:
    """% of one core the coordinator spends moving ``actions_per_s`` actions."""
    return 100.0 * actions_per_s * cpu_s_per_action


# ----- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured (or derived) number."""

    section: str
    what: str
    value: float
    unit: str
    note: str = ""


def fmt(value: float, unit: str) -> str:
    if value == int(value) and abs(value) < 100:
        text = f"{int(value)}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


@dataclass
class Report:
    """The rows so far, the machine, and the sections that failed."""

    rows: list[Row] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def add(self, section: str, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(section, what, value, unit, note))
        log(f"  {section}: {what}: {fmt(value, unit)}{'  (' + note + ')' if note else ''}")


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, load average, Python, commit, date."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": loadavg(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def render(report: Report, host: dict[str, Any]) -> None:
    print(
        f"Machine: {host['cores']} cores, {host['cpu']}, {host['memory_gib']} GiB;"
        f" Python {host['python']}; commit {host['commit']}; {host['date']}; load average"
        f" (1, 5, 15 min) {host['load_start']} at the start, {host['load_end']} at the end;"
        f" {host['runtime_s']:.0f} s in all."
    )
    print()
    print("| section | measurement | value | how |")
    print("| --- | --- | --- | --- |")
    for r in report.rows:
        print(f"| {r.section} | {r.what} | {fmt(r.value, r.unit)} | {r.note} |")
    for section, error in report.failed.items():
        print(f"| {section} | FAILED | - | {error.splitlines()[0][:200]} |")
