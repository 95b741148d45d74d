"""Parallel-execution keys of workflow files and the builder (plait.spec.patterns).

join, map, resources, timeouts, priority, semaphores/locks and the workflow-wide keys: each maps
onto its proto field, each bad shape is refused naming file, action and field, and the builder
builds exactly what the YAML does.
"""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from plait.spec import Join, SpecError, Workflow, load_workflow, loads_workflow
from plait.v1 import workflow_pb2 as wf

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

ALL, ANY, AT_LEAST = wf.JOIN_KIND_ALL, wf.JOIN_KIND_ANY, wf.JOIN_KIND_AT_LEAST
HEAD = "name: t\nactions:\n  - {id: a, run: [x]}\n  - {id: b, run: [x]}\n"


def action(body: str) -> wf.ActionSpec:
    """Loads HEAD plus one action written as a flow mapping; returns that action."""
    return loads_workflow(HEAD + f"  - {{{body}}}\n").actions[2]


def sem(name: str, permits: int = 1, capacity: int = 1) -> wf.SemaphoreRequest:
    return wf.SemaphoreRequest(name=name, permits=permits, capacity=capacity)


# -- each key maps onto its field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("join", "expected"),
    [
        ("all", wf.JoinPolicy(kind=ALL)),
        ("any", wf.JoinPolicy(kind=ANY)),
        ("{all: null}", wf.JoinPolicy(kind=ALL)),
        ("{any: {}}", wf.JoinPolicy(kind=ANY)),
        ("{any: {cancel_remaining: true}}", wf.JoinPolicy(kind=ANY, cancel_remaining=True)),
        ("{any: null, cancel_remaining: true}", wf.JoinPolicy(kind=ANY, cancel_remaining=True)),
        ("{any: {cancel_remaining: false}}", wf.JoinPolicy(kind=ANY)),
        ("{at_least: 2}", wf.JoinPolicy(kind=AT_LEAST, at_least_count=2)),
        ("{at_least: 0.9}", wf.JoinPolicy(kind=AT_LEAST, at_least_fraction=0.9)),
        ("{at_least: 1.0}", wf.JoinPolicy(kind=AT_LEAST, at_least_fraction=1.0)),
        ("{at_least: '50%'}", wf.JoinPolicy(kind=AT_LEAST, at_least_fraction=0.5)),
        (
            "{at_least: 2, cancel_remaining: true}",
            wf.JoinPolicy(kind=AT_LEAST, at_least_count=2, cancel_remaining=True),
        ),
    ],
)
def test_join_maps_onto_join_policy(join: str, expected: wf.JoinPolicy) -> None:
    got = action(f"id: c, needs: [a, b], run: [x], join: {join}")
    assert got.HasField("join")
    assert got.join == expected


def test_no_join_leaves_the_field_unset() -> None:
    assert not action("id: c, needs: [a, b], run: [x]").HasField("join")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a.items", wf.MapSpec(over="a.items")),
        ("a.out.files", wf.MapSpec(over="a.out.files")),
        ("{over: a.items}", wf.MapSpec(over="a.items")),
        (
            "{over: a.items, max_parallel: 10, max_items: 1000}",
            wf.MapSpec(over="a.items", max_parallel=10, max_items=1000),
        ),
    ],
)
def test_map_maps_onto_map_spec(value: str, expected: wf.MapSpec) -> None:
    got = action(f"id: c, needs: [a], run: [x, '{{{{ item }}}}'], map: {value}")
    assert got.map == expected
    assert list(got.exec.argv) == ["x", "{{ item }}"]  # the worker expands it, per item


def test_map_over_a_need_whose_id_has_dots_is_refused() -> None:
    # The coordinator reads the need as the part before the first dot.
    with pytest.raises(SpecError, match="a need whose id contains a dot cannot be mapped over"):
        loads_workflow(
            "actions:\n  - {id: list.v2, run: [x]}\n"
            "  - {id: c, needs: [list.v2], run: [x], map: list.v2.images}\n"
        )


def test_map_action_may_join_its_children() -> None:
    got = action("id: c, needs: [a], run: [x], map: a.items, join: {at_least: 50}")
    assert got.join == wf.JoinPolicy(kind=AT_LEAST, at_least_count=50)


def test_scheduling_keys_map_onto_the_action() -> None:
    got = action(
        "id: c, handler: h, resources: {cpu: 2, memory_mb: 4096, gpu: 1, license.matlab: 0.5},"
        " queue_timeout: 30s, heartbeat_timeout: 10s, priority: -3"
    )
    assert dict(got.resources) == {
        "cpu": 2.0,
        "memory_mb": 4096.0,
        "gpu": 1.0,
        "license.matlab": 0.5,
    }
    assert got.queue_timeout.ToTimedelta() == timedelta(seconds=30)
    assert got.heartbeat_timeout.ToTimedelta() == timedelta(seconds=10)
    assert got.priority == -3


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("concurrency_key: deploy", [sem("deploy")]),
        ("concurrency_key: deploy, concurrency_limit: 3", [sem("deploy", 1, 3)]),
        ("lock: db", [sem("db")]),
        ("lock: [db, cache]", [sem("db"), sem("cache")]),
        ("semaphores: [db]", [sem("db")]),
        (
            "semaphores: [{name: gpu-pool, permits: 2, capacity: 4}, {name: api, capacity: 2}]",
            [sem("gpu-pool", 2, 4), sem("api", 1, 2)],
        ),
        (
            # A fixed order whatever the key order: concurrency_key, lock, semaphores.
            "semaphores: [s], lock: l, concurrency_key: k",
            [sem("k"), sem("l"), sem("s")],
        ),
    ],
)
def test_semaphore_keys_map_onto_requests(keys: str, expected: list[wf.SemaphoreRequest]) -> None:
    assert list(action(f"id: c, run: [x], {keys}").semaphores) == expected


def test_workflow_keys_map_onto_the_spec() -> None:
    spec = loads_workflow(
        "fail_fast: true\nmax_parallel: 8\ndeadline: 1h\npriority: 5\n"
        "actions: [{id: a, run: [x]}]\n"
    )
    assert spec.fail_fast
    assert spec.max_parallel == 8
    assert spec.deadline.ToTimedelta() == timedelta(hours=1)
    assert spec.priority == 5


def test_workflow_keys_default_to_unset() -> None:
    spec = loads_workflow("actions: [{id: a, run: [x]}]\n")
    assert not spec.fail_fast
    assert spec.max_parallel == 0
    assert not spec.HasField("deadline")
    assert spec.priority == 0


# -- every bad shape is refused naming file, action and field ---------------------------------


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        # join
        ("needs: [a, b], run: [x], join: some", "join", "expected all, any,"),
        ("needs: [a, b], run: [x], join: at_least", "join", "at_least needs a count"),
        ("needs: [a, b], run: [x], join: [any]", "join", "got a list"),
        ("needs: [a, b], run: [x], join: {}", "join", "exactly one of all, any or at_least"),
        ("needs: [a, b], run: [x], join: {any: null, all: null}", "join", "got all and any"),
        ("needs: [a, b], run: [x], join: {at_least: 0}", "join.at_least", "between 1 and"),
        ("needs: [a, b], run: [x], join: {at_least: -1}", "join.at_least", "between 1 and"),
        ("needs: [a, b], run: [x], join: {at_least: 1.5}", "join.at_least", "fraction in (0, 1]"),
        ("needs: [a, b], run: [x], join: {at_least: 0.0}", "join.at_least", "fraction in (0, 1]"),
        ("needs: [a, b], run: [x], join: {at_least: true}", "join.at_least", "expected a count"),
        ("needs: [a, b], run: [x], join: {at_least: lots}", "join.at_least", "expected a count"),
        ("needs: [a, b], run: [x], join: {at_least: 3}", "join.at_least", "more than the 2"),
        ("needs: [a, b], run: [x], join: {any: 3}", "join.any", "cancel_remaining: true"),
        ("needs: [a, b], run: [x], join: {all: 3}", "join.all", "expected nothing"),
        ("needs: [a, b], run: [x], join: {any: {fast: true}}", "join.any.fast", "unknown key"),
        ("needs: [a, b], run: [x], join: {first: true}", "join.first", "allowed join keys"),
        (
            "needs: [a, b], run: [x], join: {any: null, cancel_remaining: yes please}",
            "join.cancel_remaining",
            "expected true or false",
        ),
        (
            "needs: [a, b], run: [x], join: {all: null, cancel_remaining: true}",
            "join.cancel_remaining",
            "applies to any and at_least",
        ),
        (
            "needs: [a, b], run: [x],"
            " join: {any: {cancel_remaining: true}, cancel_remaining: true}",
            "join.any.cancel_remaining",
            "given twice",
        ),
        ("run: [x], join: any", "join", "this one has none"),
        # map
        ("run: [x], map: a.items", "map", "the action has no needs: add it to needs"),
        ("needs: [a], run: [x], map: b.items", "map", "one of the action's needs (a)"),
        ("needs: [a], run: [x], map: a", "map", "write a.<key>"),
        ("needs: [a], run: [x], map: a..items", "map", "dotted path"),
        ("needs: [a], run: [x], map: 3", "map", "expected '<need>.<path>'"),
        ("needs: [a], run: [x], map: {max_parallel: 2}", "map.over", "is required"),
        ("needs: [a], run: [x], map: {over: 3}", "map.over", "expected '<need>.<path>'"),
        (
            "needs: [a], run: [x], map: {over: a.x, max_parallel: 0}",
            "map.max_parallel",
            "between 1",
        ),
        ("needs: [a], run: [x], map: {over: a.x, max_items: two}", "map.max_items", "whole number"),
        ("needs: [a], run: [x], map: {over: a.x, width: 2}", "map.width", "allowed map keys"),
        # resources
        ("run: [x], resources: [cpu]", "resources", "expected a mapping of resource names"),
        ("run: [x], resources: {cpu: -1}", "resources.cpu", "expected a number >= 0"),
        ("run: [x], resources: {cpu: true}", "resources.cpu", "expected a number >= 0"),
        ("run: [x], resources: {memory_mb: 4Gi}", "resources.memory_mb", "a number of MiB"),
        ("run: [x], resources: {memory: 4096}", "resources.memory", "write memory as memory_mb"),
        ("run: [x], resources: {'-x': 1}", "resources.-x", "resource names are"),
        ("run: [x], resources: {nvidia.com/gpu: 1}", "resources.nvidia.com/gpu", "names are"),
        # timeouts and priority
        ("run: [x], queue_timeout: soon", "queue_timeout", "expected a duration"),
        ("run: [x], queue_timeout: 0s", "queue_timeout", "greater than zero"),
        ("handler: h, heartbeat_timeout: -1s", "heartbeat_timeout", "expected a duration"),
        ("run: [x], heartbeat_timeout: 5s", "heartbeat_timeout", "applies to handler actions"),
        ("run: [x], priority: high", "priority", "expected a whole number"),
        ("run: [x], priority: 1001", "priority", "between -1000 and 1000"),
        # semaphores and locks
        ("run: [x], concurrency_key: ''", "concurrency_key", "expected a name"),
        ("run: [x], concurrency_limit: 2", "concurrency_limit", "needs a concurrency_key"),
        ("run: [x], concurrency_key: k, concurrency_limit: 0", "concurrency_limit", "between 1"),
        ("run: [x], lock: {name: db}", "lock", "expected a lock name or a list"),
        ("run: [x], lock: []", "lock", "expected a lock name or a list"),
        ("run: [x], lock: [db, 'a b']", "lock[1]", "expected a name"),
        ("run: [x], semaphores: db", "semaphores", "expected a list"),
        ("run: [x], semaphores: [3]", "semaphores[0]", "expected a name or a mapping"),
        ("run: [x], semaphores: [{permits: 1}]", "semaphores[0].name", "is required"),
        ("run: [x], semaphores: [{name: s, permits: 0}]", "semaphores[0].permits", "between 1"),
        ("run: [x], semaphores: [{name: s, capacity: 0}]", "semaphores[0].capacity", "between 1"),
        ("run: [x], semaphores: [{name: s, permits: 2}]", "semaphores[0].permits", "capacity of 1"),
        ("run: [x], semaphores: [{name: s, weight: 2}]", "semaphores[0].weight", "unknown key"),
        ("run: [x], lock: db, semaphores: [db]", "semaphores[0]", "already requested by lock"),
        (
            "run: [x], concurrency_key: db, lock: db",
            "lock",
            "already requested by concurrency_key",
        ),
        ("run: [x], pipeline: {}", "pipeline", "a pipeline runs its stages"),
        ("pipeline: {over: a.items}", "pipeline.stages", "non-empty list of stages"),
        ("run: [x], speculate: {}", "speculate", "needs after (a duration), p95: true"),
        ("run: [x], speculate: {p95: maybe}", "speculate.p95", "expected true or false"),
    ],
)
def test_bad_shapes_name_file_action_and_field(
    tmp_path: Path, body: str, field: str, fragment: str
) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(HEAD + f"  - {{id: c, {body}}}\n")
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    err = info.value
    assert f"actions[2].{field}" in [v.field for v in err.violations], err.lines
    line = next(x for x in err.lines if f"(id 'c'): {field}:" in x)
    assert line.startswith(f"{path}: actions[2] (id 'c'): {field}: ")
    assert fragment in line, line


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("fail_fast: 1\n", "fail_fast", "expected true or false"),
        ("max_parallel: 0\n", "max_parallel", "between 1 and"),
        ("max_parallel: many\n", "max_parallel", "expected a whole number"),
        ("deadline: 0s\n", "deadline", "greater than zero"),
        ("deadline: tomorrow\n", "deadline", "expected a duration"),
        ("priority: 1.5\n", "priority", "expected a whole number"),
        ("defaults: {priority: 3}\n", "defaults.priority", "allowed defaults keys: retry, timeout"),
    ],
)
def test_bad_workflow_keys_name_file_and_field(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(text + "actions: [{id: a, run: [x]}]\n")
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    assert field in [v.field for v in info.value.violations]
    assert str(info.value).startswith(f"{path}: {field}: ")
    assert fragment in str(info.value)


def test_count_is_bounded_by_needs_but_not_on_a_map_action() -> None:
    # A map action's join counts its children, known only at runtime; any other counts needs.
    text = (
        "actions:\n  - {id: list, run: [x]}\n"
        "  - {id: resize, needs: list, run: [x], map: list.images, join: {at_least: 8}}\n"
    )
    assert loads_workflow(text).actions[1].join.at_least_count == 8
    with pytest.raises(SpecError, match=r"\(id 'index'\): join.at_least: at_least 8 is more"):
        loads_workflow(text + "  - {id: index, needs: resize, handler: h, join: {at_least: 8}}\n")


# -- the builder builds what the YAML does ----------------------------------------------------

PATTERNS = """
    name: patterns
    fail_fast: true
    max_parallel: 8
    deadline: 1h
    priority: 2
    defaults: {retry: {max_attempts: 3, backoff: 1s}, timeout: 5m}
    actions:
      - {id: list, run: [python3, list.py]}
      - id: resize
        needs: [list]
        map: {over: list.images, max_parallel: 10, max_items: 1000}
        run: [python3, resize.py, "{{ item }}"]
        join: {at_least: 0.9}
        resources: {cpu: 2, memory_mb: 4096}
        selector: {zone: eu}
        queue_timeout: 30s
        priority: 5
        semaphores: [{name: storage, permits: 2, capacity: 8}]
      - id: mirror-a
        run: [fetch, a]
        concurrency_key: mirrors
        concurrency_limit: 2
      - {id: mirror-b, run: [fetch, b], concurrency_key: mirrors, concurrency_limit: 2}
      - id: pick
        needs: [mirror-a, mirror-b]
        join: {any: {cancel_remaining: true}}
        handler: pick
        heartbeat_timeout: 10s
        lock: db
      - id: quorum
        needs: [mirror-a, mirror-b, pick]
        join: {at_least: 2, cancel_remaining: true}
        handler: commit
        resources: {gpu: 1}
"""


def test_builder_matches_yaml() -> None:
    w = Workflow(
        "patterns",
        defaults={"retry": {"max_attempts": 3, "backoff": "1s"}, "timeout": "5m"},
        fail_fast=True,
        max_parallel=8,
        deadline=timedelta(hours=1),
        priority=2,
    )
    listing = w.exec("list", ["python3", "list.py"])
    w.exec(
        "resize",
        ["python3", "resize.py", "{{ item }}"],
        needs=[listing],
        map={"over": "list.images", "max_parallel": 10, "max_items": 1000},
        join=Join.at_least(0.9),
        resources={"cpu": 2, "memory_mb": 4096},
        selector={"zone": "eu"},
        queue_timeout=timedelta(seconds=30),
        priority=5,
        semaphores=[{"name": "storage", "permits": 2, "capacity": 8}],
    )
    a = w.exec("mirror-a", ["fetch", "a"], concurrency_key="mirrors", concurrency_limit=2)
    b = w.exec("mirror-b", ["fetch", "b"], concurrency_key="mirrors", concurrency_limit=2)
    pick = w.handler(
        "pick",
        "pick",
        needs=[a, b],
        join=Join.any(cancel_remaining=True),
        heartbeat_timeout="10s",
        lock="db",
    )
    w.handler(
        "quorum",
        "commit",
        needs=[a, b, pick],
        join=Join.at_least(2, cancel_remaining=True),
        resources={"gpu": 1},
    )
    assert w.to_spec() == loads_workflow(textwrap.dedent(PATTERNS))


def test_builder_join_forms() -> None:
    assert Join.all().to_doc() == "all"
    assert Join.any().to_doc() == "any"
    assert Join.any(cancel_remaining=True).to_doc() == {"any": {"cancel_remaining": True}}
    assert Join.at_least(8).to_doc() == {"at_least": 8}
    assert Join.at_least(0.9, cancel_remaining=True).to_doc() == {
        "at_least": 0.9,
        "cancel_remaining": True,
    }
    w = Workflow("w")
    w.exec("a", ["x"])
    w.exec("b", ["x"])
    for i, (given, expected) in enumerate(
        [
            (Join.all(), wf.JoinPolicy(kind=ALL)),
            ("any", wf.JoinPolicy(kind=ANY)),
            ({"at_least": 2}, wf.JoinPolicy(kind=AT_LEAST, at_least_count=2)),
        ]
    ):
        w.handler(f"j{i}", "h", needs=["a", "b"], join=given)
        assert w.to_spec().actions[-1].join == expected


def test_builder_map_over_is_short_for_map() -> None:
    w = Workflow("w")
    w.exec("list", ["x"])
    w.exec("each", ["y", "{{ item }}"], needs="list", map_over="list.items")
    assert w.to_spec().actions[1].map == wf.MapSpec(over="list.items")
    with pytest.raises(TypeError, match="not both"):
        w.exec("both", ["y"], needs="list", map="list.a", map_over="list.b")


def test_builder_refuses_at_the_bad_call() -> None:
    w = Workflow("w")
    w.exec("a", ["x"])
    with pytest.raises(SpecError) as info:
        w.exec("b", ["x"], needs="a", join=Join.at_least(1.5))
    assert str(info.value).startswith("Workflow('w'): actions[1] (id 'b'): join.at_least: ")
    with pytest.raises(SpecError, match=r"actions\[1\] \(id 'b'\): map: .*needs \(a\)"):
        w.exec("b", ["x"], needs="a", map_over="z.items")
    with pytest.raises(SpecError, match=r"^Workflow\('w'\): max_parallel: must be between"):
        Workflow("w", max_parallel=0)
    with pytest.raises(SpecError, match=r"^Workflow\('w'\): deadline: "):
        Workflow("w", deadline="whenever")
    assert [x.id for x in w.to_spec().actions] == ["a"]


def test_builder_checks_join_counts_at_to_spec() -> None:
    w = Workflow("w")
    w.exec("a", ["x"])
    w.handler("b", "h", needs="a", join=Join.at_least(2))
    with pytest.raises(SpecError, match=r"join\.at_least: at_least 2 is more than the 1 need"):
        w.to_spec()


# -- examples ---------------------------------------------------------------------------------


def test_design_example_loads() -> None:
    spec = load_workflow(EXAMPLES / "thumbnails.yaml")
    listing, resize, index = spec.actions
    assert spec.name == "thumbnails"
    assert spec.defaults.retry.max_attempts == 3
    assert spec.defaults.timeout.ToTimedelta() == timedelta(minutes=5)
    assert listing.WhichOneof("kind") == "exec"
    assert resize.map == wf.MapSpec(over="list.images")
    assert "{{ item }}" in resize.exec.argv[0]
    assert index.join == wf.JoinPolicy(kind=AT_LEAST, at_least_fraction=0.9)
    assert index.handler == "build-index"
    assert (EXAMPLES / "thumbnails" / "handlers.py").read_text().count('"build-index"') == 1


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("join_any.yaml", lambda s: s.actions[-1].join.kind == ANY),
        ("join_any.yaml", lambda s: s.actions[-1].join.cancel_remaining),
        ("quorum.yaml", lambda s: s.actions[-1].join.at_least_count == 2),
        ("map_fanout.yaml", lambda s: s.actions[1].map.max_parallel == 4),
        ("fail_fast.yaml", lambda s: s.fail_fast),
        ("resources.yaml", lambda s: s.actions[1].resources["gpu"] == 1),
        ("resources.yaml", lambda s: dict(s.actions[1].selector) == {"accelerator": "gpu"}),
        ("semaphores.yaml", lambda s: all(a.semaphores for a in s.actions)),
        ("semaphores.yaml", lambda s: sum(sem("db") in a.semaphores for a in s.actions) == 5),
        ("retries_timeouts.yaml", lambda s: list(s.actions[0].retry.retryable_exit_codes) == [75]),
        ("retries_timeouts.yaml", lambda s: s.actions[1].HasField("timeout")),
        ("retries_timeouts.yaml", lambda s: s.actions[2].HasField("queue_timeout")),
        ("retries_timeouts.yaml", lambda s: s.HasField("deadline")),
    ],
)
def test_pattern_examples_load(name: str, check: object) -> None:
    spec = load_workflow(EXAMPLES / name)
    assert callable(check)
    assert check(spec)
    for a in spec.actions:
        if a.WhichOneof("kind") == "exec" and "$PLAIT_WORKFLOW_DIR/" in a.exec.argv[0]:
            script = a.exec.argv[0].split("$PLAIT_WORKFLOW_DIR/", 1)[1].split('"', 1)[0]
            assert (EXAMPLES / script).is_file(), script


def test_pipeline_yaml_maps_to_the_spec(tmp_path: Path) -> None:
    from plait.spec import load_workflow

    path = tmp_path / "etl.yaml"
    path.write_text(
        "name: etl\n"
        "actions:\n"
        "  - id: plan\n    run: [python3, plan.py]\n"
        "  - id: etl\n    needs: [plan]\n"
        "    pipeline:\n"
        "      over: plan.numbers\n      max_in_flight: 3\n"
        "      stages:\n"
        "        - {id: fetch, run: [python3, fetch.py]}\n"
        "        - {id: parse, handler: parse, timeout: 5s}\n"
    )
    spec = load_workflow(str(path))
    p = spec.actions[1].pipeline
    assert (p.over, p.max_in_flight) == ("plan.numbers", 3)
    assert [s.id for s in p.stages] == ["fetch", "parse"]
    assert spec.env["PLAIT_WORKFLOW_DIR"] == str(tmp_path)  # stages get it at grant time
    assert "PLAIT_WORKFLOW_DIR" not in p.stages[0].env
    assert p.stages[1].handler == "parse" and p.stages[1].timeout.seconds == 5
    assert spec.actions[1].WhichOneof("kind") is None


@pytest.mark.parametrize(
    ("value", "after_ms", "p95"),
    [("2s", 2000, False), ("p95", 0, True), ("{after: 500ms, p95: true}", 500, True)],
)
def test_speculate_forms(tmp_path: Path, value: str, after_ms: int, p95: bool) -> None:
    from plait.spec import load_workflow

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nactions:\n  - id: a\n    run: [x]\n    speculate: {value}\n")
    sp = load_workflow(str(path)).actions[0].speculate
    assert (sp.after.ToMilliseconds(), sp.after_p95) == (after_ms, p95)
