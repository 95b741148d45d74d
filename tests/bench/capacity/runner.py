"""The capacity runner: how much of each section to run (the full plan or ``--quick``), the
sections by name, and ``main`` (``python -m tests.bench.capacity``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from tests import procs
from tests.bench.capacity.benches import memory_section, replay_section, shapes_section
from tests.bench.capacity.journal import journal
from tests.bench.capacity.postgres import postgres
from tests.bench.capacity.table import Report, loadavg, log, machine, render
from tests.bench.capacity.workers import busy, idle
from tests.bench.graphs import Sizes

SECTIONS = ("idle", "busy", "shapes", "journal", "memory", "replay", "postgres")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Plan:
    """How much of everything to run: the full plan or ``--quick``."""

    idle_counts: list[int]
    idle_window: float
    idle_base: float
    busy_loads: list[tuple[float, int]]
    shape_sizes: Sizes
    shape_keys: tuple[str, ...]
    shape_rounds: int
    journal_workflows: int
    journal_width: int
    small_workflows: int
    restart_samples: int
    memory_actions: int
    replay_events: int
    replay_rounds: int
    pg_fanout: int
    failover_trials: int
    default_ttl_trial: bool


def plan(quick: bool) -> Plan:
    """The full plan, or ``--quick``'s: every size below is ``pick(full, quick)``."""

    def pick(full: _T, fast: _T) -> _T:
        return fast if quick else full

    return Plan(
        idle_counts=pick([250, 500, 1000], [250, 1000]),
        idle_window=pick(15.0, 8.0),
        idle_base=pick(5.0, 3.0),
        busy_loads=pick(
            [(1.0, 2_000), (0.1, 20_000), (0.0, 20_000)],
            [(0.1, 8_000), (0.0, 8_000)],
        ),
        shape_sizes=pick(
            Sizes(fanout=5_000, layers=25, width=200, chain=1_000, sleeps=2_000, exec=1_000),
            Sizes(fanout=3_000, layers=15, width=200, chain=500, sleeps=1_000, exec=500),
        ),
        shape_keys=pick(
            ("fanout", "layered", "chain", "sleeps", "exec4"),
            ("fanout", "layered", "chain", "sleeps"),
        ),
        shape_rounds=pick(3, 1),
        journal_workflows=pick(12, 4),
        journal_width=2_500,
        small_workflows=pick(2_000, 300),
        restart_samples=pick(3, 2),
        memory_actions=pick(100_000, 50_000),
        replay_events=pick(300_000, 100_000),
        replay_rounds=pick(3, 2),
        pg_fanout=pick(5_000, 2_000),
        failover_trials=pick(5, 3),
        default_ttl_trial=pick(True, False),
    )


FULL = plan(quick=False)
QUICK = plan(quick=True)


def sections(plan: Plan) -> dict[str, Callable[[Report], None]]:
    return {
        "idle": lambda r: idle(r, plan.idle_counts, plan.idle_window, plan.idle_base),
        "busy": lambda r: busy(r, 4, 50, plan.busy_loads),
        "shapes": lambda r: shapes_section(r, plan.shape_sizes, plan.shape_keys, plan.shape_rounds),
        "journal": lambda r: journal(
            r,
            plan.journal_workflows,
            plan.journal_width,
            plan.small_workflows,
            plan.restart_samples,
            plan.pg_fanout,
        ),
        "memory": lambda r: memory_section(r, plan.memory_actions),
        "replay": lambda r: replay_section(r, plan.replay_events, plan.replay_rounds),
        "postgres": lambda r: postgres(
            r, plan.pg_fanout, plan.failover_trials, plan.default_ttl_trial
        ),
    }


def main(argv: list[str] | None = None) -> int:
    from tests.bench import capacity  # its docstring is the help

    p = argparse.ArgumentParser(
        prog="python -m tests.bench.capacity",
        description=capacity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (~2 min)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}"
    )
    p.add_argument("--json", type=Path, help="write the machine and every row here")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")

    procs.become_subreaper()
    started = time.perf_counter()
    host = machine()
    log(f"capacity: {host}")
    report = Report()
    runners = sections(QUICK if args.quick else FULL)
    timings: dict[str, float] = {}
    for name in chosen:
        log(f"== {name} (load {loadavg()})")
        t0 = time.perf_counter()
        try:
            runners[name](report)
        except (Exception, SystemExit) as err:  # a failed section is a row, not a lost table
            report.failed[name] = f"{type(err).__name__}: {err}"
            log(f"  {name} FAILED: {str(err)[-2000:]}")
        timings[name] = time.perf_counter() - t0
        log(f"  {name}: {timings[name]:.0f} s")
    host["load_end"] = loadavg()
    host["runtime_s"] = time.perf_counter() - started
    host["section_s"] = {k: round(v, 1) for k, v in timings.items()}
    host["plan"] = "quick" if args.quick else "full"
    render(report, host)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": host,
                    "rows": [asdict(r) for r in report.rows],
                    "failed": report.failed,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if report.failed else 0
