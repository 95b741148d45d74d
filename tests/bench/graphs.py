"""The benchmark shapes as plain graphs, shared by Plait's runner and the peers' (Dask, Ray).

No Plait import here: ``tests.bench.peers`` runs this module in the peers' own venv
(``.venv-peers``), which has Dask and Ray but not Plait. A graph is a list of nodes in
topological order; each node names the nodes it needs. ``tests.bench.shapes`` turns a graph
into a ``WorkflowSpec``; the peers turn it into futures (Dask) or object refs (Ray).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum


class Work(StrEnum):
    """What each action of a shape does."""

    NOOP = "noop"  # Plait: the `noop` handler; peers: a function that returns None
    SLEEP = "sleep10ms"  # Plait: `await asyncio.sleep(0.01)`; peers: time.sleep(0.01)
    EXEC = "exec"  # Plait only: an exec action of /bin/true under workerd's default sandbox


class Unit(StrEnum):
    """How a shape's result is reported."""

    RATE = "actions/s"  # actions / seconds: higher is better
    MS_PER_STEP = "ms/step"  # milliseconds / actions: lower is better
    EFFICIENCY = "% of ideal"  # ideal seconds / measured seconds: higher is better


@dataclass(frozen=True)
class Node:
    """One action: its id and the ids it needs (all earlier in the graph's order)."""

    id: str
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: a graph, what its actions do, and the slots it runs on."""

    key: str  # short name, used on the command line and in JSON results
    title: str  # the table's row label
    work: Work
    unit: Unit
    workers: int  # worker processes
    slots: int  # slots (Plait), threads (Dask) or CPUs (Ray) per worker process
    nodes: list[Node] = field(repr=False)
    peers: bool = True  # whether Dask and Ray run it too
    goal: str = ""  # the goal issue 13 sets, shown beside the result

    @property
    def total_slots(self) -> int:
        return self.workers * self.slots

    def ideal_s(self, action_s: float) -> float:
        """Seconds the shape would take with every slot always busy on ``action_s`` actions."""
        return len(self.nodes) * action_s / self.total_slots

    def score(self, seconds: float) -> float:
        """The shape's reported number for a run that took ``seconds``."""
        n = len(self.nodes)
        if self.unit is Unit.MS_PER_STEP:
            return seconds * 1000 / n
        if self.unit is Unit.EFFICIENCY:
            return 100 * self.ideal_s(SLEEP_S) / seconds
        return n / seconds


SLEEP_S = 0.01  # the sleep shape's action length


def fanout(n: int) -> list[Node]:
    """``n`` independent actions, then one join that needs every one of them."""
    nodes = [Node(f"n{i}") for i in range(n)]
    return [*nodes, Node("join", tuple(node.id for node in nodes))]


def layered(layers: int, width: int, deps: int = 2, seed: int = 13) -> list[Node]:
    """``layers`` x ``width`` actions; each one past the first layer needs ``deps`` distinct
    actions of the layer before, picked by a seeded RNG (every system gets the same graph)."""
    rng = random.Random(seed)
    nodes: list[Node] = []
    for layer in range(layers):
        for i in range(width):
            needs = (
                tuple(f"l{layer - 1}-{j}" for j in sorted(rng.sample(range(width), deps)))
                if layer
                else ()
            )
            nodes.append(Node(f"l{layer}-{i}", needs))
    return nodes


def chain(n: int) -> list[Node]:
    """``n`` actions, each needing the one before."""
    return [Node(f"c{i}", (f"c{i - 1}",) if i else ()) for i in range(n)]


def independent(n: int, prefix: str) -> list[Node]:
    """``n`` actions with no needs."""
    return [Node(f"{prefix}{i}") for i in range(n)]


@dataclass(frozen=True)
class Sizes:
    """The shapes' sizes (the defaults are issue 13's)."""

    fanout: int = 10_000
    layers: int = 50
    width: int = 200
    chain: int = 2_000
    sleeps: int = 2_000
    exec: int = 2_000


def shapes(sizes: Sizes = Sizes()) -> list[Shape]:
    """Every shape, in the table's order."""
    return [
        Shape(
            "fanout",
            f"{sizes.fanout:,} no-op fan-out + join",
            Work.NOOP,
            Unit.RATE,
            2,
            1,
            fanout(sizes.fanout),
            goal=">= 6x best peer",
        ),
        Shape(
            "layered",
            f"{sizes.layers} layers x {sizes.width}, 2 random deps",
            Work.NOOP,
            Unit.RATE,
            2,
            1,
            layered(sizes.layers, sizes.width),
            goal=">= 10,000 /s",
        ),
        Shape(
            "chain",
            f"chain of {sizes.chain:,} no-ops",
            Work.NOOP,
            Unit.MS_PER_STEP,
            2,
            1,
            chain(sizes.chain),
            goal="<= 1.0 ms/step",
        ),
        Shape(
            "sleeps",
            f"{sizes.sleeps:,} x 10 ms sleeps, 2 x 8 slots",
            Work.SLEEP,
            Unit.EFFICIENCY,
            2,
            8,
            independent(sizes.sleeps, "s"),
            goal=">= 90 %",
        ),
        Shape(
            "exec1",
            f"{sizes.exec:,} exec /bin/true, 2 workerd x 1",
            Work.EXEC,
            Unit.RATE,
            2,
            1,
            independent(sizes.exec, "t"),
            peers=False,
            goal=">= 1,000 /s (sandbox on)",
        ),
        Shape(
            "exec4",
            f"{sizes.exec:,} exec /bin/true, 2 workerd x 4",
            Work.EXEC,
            Unit.RATE,
            2,
            4,
            independent(sizes.exec, "t"),
            peers=False,
            goal=">= 1,000 /s (sandbox on)",
        ),
    ]


SHAPE_KEYS = ("fanout", "layered", "chain", "sleeps", "exec1", "exec4")
