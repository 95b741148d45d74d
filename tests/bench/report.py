"""The benchmark's table: medians per shape and system, the best peer and Plait's ratio to it.

A rich table on a terminal; otherwise (a pipe, a file, ``--markdown``) a Markdown table that
pastes into an issue or a note as it is.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

from tests.bench.graphs import Shape, Unit

PEER_NAMES = {"dask": "Dask", "ray": "Ray"}
NONE = "\N{EN DASH}"  # an empty cell, as in the table


@dataclass(frozen=True)
class Measurement:
    """One run of one shape by one system in one round."""

    system: str  # "plait", "dask" or "ray"
    shape: str
    round: int
    seconds: float  # end to end
    ok: bool
    coordinator_s: float | None = None  # Plait only: submitted_hlc -> finished_hlc
    error: str = ""


def better(unit: Unit, a: float, b: float) -> bool:
    """Whether score ``a`` is better than score ``b``."""
    return a < b if unit is Unit.MS_PER_STEP else a > b


def speed_ratio(unit: Unit, plait: float, peer: float) -> float:
    """How many times as fast as the peer Plait is (> 1: Plait ahead), whatever the unit."""
    return peer / plait if unit is Unit.MS_PER_STEP else plait / peer


def fmt(unit: Unit, value: float | None) -> str:
    if value is None:
        return NONE
    if unit is Unit.MS_PER_STEP:
        return f"{value:.2f} ms/step"
    if unit is Unit.EFFICIENCY:
        return f"{value:.1f} %"
    return f"{value:,.0f} /s"


@dataclass(frozen=True)
class Row:
    """One shape's cells."""

    shape: Shape
    plait: float | None
    plait_coordinator: float | None
    peers: dict[str, float | None]
    failed: list[str]  # systems with a failed or missing run

    @property
    def best_peer(self) -> tuple[str, float] | None:
        scored = [(name, v) for name, v in self.peers.items() if v is not None]
        if not scored:
            return None
        best = scored[0]
        for name, v in scored[1:]:
            if better(self.shape.unit, v, best[1]):
                best = (name, v)
        return best


def median_score(shape: Shape, runs: list[Measurement], coordinator: bool = False) -> float | None:
    """The median score over the rounds whose runs succeeded (None when none did)."""
    seconds = [
        (r.coordinator_s if coordinator else r.seconds)
        for r in runs
        if r.ok and (r.coordinator_s is not None or not coordinator)
    ]
    scores = [shape.score(s) for s in seconds if s is not None and s > 0]
    return statistics.median(scores) if scores else None


def rows(shapes: list[Shape], peers: list[str], results: list[Measurement]) -> list[Row]:
    out = []
    for shape in shapes:
        mine = [r for r in results if r.shape == shape.key]
        plait_runs = [r for r in mine if r.system == "plait"]
        failed = sorted({r.system for r in mine if not r.ok})
        peer_scores = {
            name: median_score(shape, [r for r in mine if r.system == name])
            if shape.peers
            else None
            for name in peers
        }
        out.append(
            Row(
                shape,
                median_score(shape, plait_runs),
                median_score(shape, plait_runs, coordinator=True),
                peer_scores,
                failed,
            )
        )
    return out


def table_cells(row: Row, peers: list[str]) -> list[str]:
    unit = row.shape.unit
    cells = [row.shape.title, fmt(unit, row.plait), fmt(unit, row.plait_coordinator)]
    if peers:
        cells += [fmt(unit, row.peers.get(name)) for name in peers]
        best = row.best_peer
        if best is None:
            cells += [NONE, NONE]
        else:
            cells.append(f"{PEER_NAMES.get(best[0], best[0])} {fmt(unit, best[1])}")
            cells.append(
                NONE if row.plait is None else f"{speed_ratio(unit, row.plait, best[1]):.2f}x"
            )
    cells.append(row.shape.goal)
    if row.failed:
        cells[0] += f" (FAILED: {', '.join(row.failed)})"
    return cells


def headers(peers: list[str]) -> list[str]:
    heads = ["shape (workers x slots)", "Plait", "Plait (coordinator)"]
    if peers:
        heads += [PEER_NAMES.get(p, p) for p in peers]
        heads += ["best peer", "Plait / best peer"]
    return [*heads, "goal (issue 13)"]


def notes(rounds: int, peers: list[str]) -> list[str]:
    lines = [
        f"Medians of {rounds} round(s), systems alternating within each round. 'Plait' is end to"
        " end (submit call -> the client sees the workflow finish, polled every 20 ms), like the"
        " peers; 'Plait (coordinator)' is submitted_hlc -> finished_hlc on the coordinator.",
        "Unless the row says otherwise: 2 worker processes x 1 slot each.",
    ]
    if peers:
        lines.append(
            "Plait / best peer is a ratio of speeds (> 1: Plait ahead); for ms/step it is the"
            f" best peer's ms/step over Plait's. '{NONE}': the peers do not run exec actions."
        )
    return lines


def render(
    shapes: list[Shape],
    peers: list[str],
    results: list[Measurement],
    rounds: int,
    markdown: bool | None = None,
) -> None:
    """Prints the table to stdout: rich on a terminal, Markdown otherwise (or when asked)."""
    table_rows = [table_cells(r, peers) for r in rows(shapes, peers, results)]
    heads = headers(peers)
    if markdown is None:
        markdown = not sys.stdout.isatty()
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("| " + " | ".join("---" for _ in heads) + " |")
        for cells in table_rows:
            print("| " + " | ".join(cells) + " |")
        print()
        for line in notes(rounds, peers):
            print(line)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Plait benchmark (issue 13 shapes)", caption="\n".join(notes(rounds, peers))
    )
    for i, head in enumerate(heads):
        table.add_column(head, justify="left" if i in (0, len(heads) - 1) else "right")
    for cells in table_rows:
        table.add_row(*cells)
    Console().print(table)
