"""The benchmark's shape builders (tests.bench.graphs, tests.bench.shapes) build what they say.

The benchmark itself is not a test (``make bench``); this only checks that every system gets
the graph the table names: the right sizes, needs that point backwards, a layered shape whose
needs lie in the layer before, a chain that is a chain, and specs Plait would accept.
"""

from __future__ import annotations

import itertools

import pytest

from plait.coordinator.config import Limits
from plait.spec.validate import validate_submit
from tests.bench import graphs
from tests.bench.graphs import Sizes, Unit, Work
from tests.bench.noop_handlers import worker
from tests.bench.shapes import spec_for

SMALL = Sizes(fanout=50, layers=6, width=20, chain=30, sleeps=40, exec=25)


def by_key() -> dict[str, graphs.Shape]:
    return {s.key: s for s in graphs.shapes(SMALL)}


def layer_of(node_id: str) -> int:
    return int(node_id.split("-", maxsplit=1)[0].removeprefix("l"))


def test_every_shape_is_a_dag_in_topological_order_with_unique_ids() -> None:
    for shape in graphs.shapes(SMALL):
        seen: set[str] = set()
        for node in shape.nodes:
            assert node.id not in seen, (shape.key, node.id)
            assert set(node.needs) <= seen, (shape.key, node.id, node.needs)
            assert len(set(node.needs)) == len(node.needs), (shape.key, node.id)
            seen.add(node.id)
    assert tuple(by_key()) == graphs.SHAPE_KEYS


def test_sizes_and_slots_match_the_issue_table() -> None:
    shapes = {s.key: s for s in graphs.shapes()}
    assert len(shapes["fanout"].nodes) == 10_001
    assert len(shapes["layered"].nodes) == 50 * 200
    assert len(shapes["chain"].nodes) == 2_000
    assert len(shapes["sleeps"].nodes) == 2_000
    assert len(shapes["exec1"].nodes) == len(shapes["exec4"].nodes) == 2_000
    slots = {key: (s.workers, s.slots) for key, s in shapes.items()}
    assert slots == {
        "fanout": (2, 1),
        "layered": (2, 1),
        "chain": (2, 1),
        "sleeps": (2, 8),
        "exec1": (2, 1),
        "exec4": (2, 4),
    }
    assert [k for k, s in shapes.items() if not s.peers] == ["exec1", "exec4"]
    assert shapes["sleeps"].ideal_s(graphs.SLEEP_S) == pytest.approx(1.25)


def test_fanout_joins_every_leaf() -> None:
    nodes = by_key()["fanout"].nodes
    *leaves, join = nodes
    assert len(leaves) == SMALL.fanout and all(not n.needs for n in leaves)
    assert join.id == "join" and set(join.needs) == {n.id for n in leaves}


def test_layered_needs_two_distinct_actions_of_the_previous_layer() -> None:
    nodes = by_key()["layered"].nodes
    assert len(nodes) == SMALL.layers * SMALL.width
    for node in nodes:
        layer = layer_of(node.id)
        if layer == 0:
            assert node.needs == ()
            continue
        assert len(node.needs) == 2 and len(set(node.needs)) == 2, node
        assert {layer_of(d) for d in node.needs} == {layer - 1}, node
    # Seeded: every system and every round gets the same graph; another seed gives another.
    assert graphs.layered(SMALL.layers, SMALL.width) == nodes
    assert graphs.layered(SMALL.layers, SMALL.width, seed=14) != nodes


def test_chain_is_a_chain() -> None:
    nodes = by_key()["chain"].nodes
    assert len(nodes) == SMALL.chain
    assert nodes[0].needs == ()
    for before, node in itertools.pairwise(nodes):
        assert node.needs == (before.id,)


def test_scores() -> None:
    shapes = by_key()
    assert shapes["fanout"].unit is Unit.RATE
    assert shapes["fanout"].score(0.5) == pytest.approx((SMALL.fanout + 1) / 0.5)
    assert shapes["chain"].score(0.3) == pytest.approx(10.0)  # 300 ms / 30 steps
    sleeps = shapes["sleeps"]  # ideal: 40 x 10 ms / 16 slots = 25 ms
    assert sleeps.score(0.05) == pytest.approx(50.0)


def test_plait_specs_carry_the_graph_and_pass_the_coordinators_validation() -> None:
    for shape in graphs.shapes(SMALL):
        spec = spec_for(shape)
        assert [(a.id, tuple(a.needs)) for a in spec.actions] == [
            (n.id, n.needs) for n in shape.nodes
        ]
        kinds = {a.WhichOneof("kind") for a in spec.actions}
        if shape.work is Work.EXEC:
            assert kinds == {"exec"}
            assert all(a.exec.argv[0].endswith("true") for a in spec.actions)
        else:
            assert kinds == {"handler"}
            assert {a.handler for a in spec.actions} == {shape.work.value}
            assert shape.work.value in worker.handlers
        validate_submit(spec, "", Limits())


def test_full_size_graphs_are_within_the_default_limits() -> None:
    limits = Limits()
    for shape in graphs.shapes():
        assert len(shape.nodes) <= limits.max_actions, shape.key
        assert max(len(n.needs) for n in shape.nodes) <= limits.max_fan_in, shape.key
