"""Submit-time validation: every bad spec is refused with the field path and the limit."""

from __future__ import annotations

import itertools

import pytest

from plait.coordinator.config import Limits
from plait.errors import InvalidArgumentError
from plait.spec.validate import find_cycle, validate_submit
from plait.v1 import workflow_pb2 as pb


def spec(*actions: tuple[str, list[str]]) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="t")
    for aid, needs in actions:
        s.actions.add(id=aid, needs=needs, handler="h")
    return s


DEFAULT_LIMITS = Limits()


def refused(
    s: pb.WorkflowSpec, limits: Limits = DEFAULT_LIMITS, key: str = ""
) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        validate_submit(s, key, limits)
    return info.value


def test_valid_dag_passes() -> None:
    validate_submit(spec(("a", []), ("b", ["a"]), ("c", ["a", "b"])), "", Limits())


def test_cycle_is_reported_with_its_path() -> None:
    err = refused(spec(("a", ["b"]), ("b", ["a"])))
    assert "a -> b -> a" in err.message or "b -> a -> b" in err.message
    assert err.violations[0].field.startswith("spec.actions[")


def test_long_cycle_path_in_execution_order() -> None:
    # c needs b, b needs a, a needs c: runs a -> b -> c -> a
    cycle = find_cycle(["a", "b", "c"], {"a": ["c"], "b": ["a"], "c": ["b"]})
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 4
    err = refused(spec(("a", ["c"]), ("b", ["a"]), ("c", ["b"])))
    path = err.message.split("cycle: ")[1].split(" -> ")
    assert path[0] == path[-1] and sorted(set(path)) == ["a", "b", "c"]
    # Every consecutive pair is a real edge in execution order (x -> y means y needs x).
    needs = {"a": ["c"], "b": ["a"], "c": ["b"]}
    assert all(x in needs[y] for x, y in itertools.pairwise(path))


def test_self_dependency() -> None:
    err = refused(spec(("a", ["a"])))
    assert err.violations[0].field == "spec.actions[0].needs[0]"
    assert "a -> a" in err.message


def test_unknown_and_duplicate_ids() -> None:
    err = refused(spec(("a", ["nope"]), ("a", [])))
    fields = {v.field: v.description for v in err.violations}
    assert "unknown action 'nope'" in fields["spec.actions[0].needs[0]"]
    assert "duplicate action id 'a'" in fields["spec.actions[1].id"]


def test_empty_workflow() -> None:
    assert refused(pb.WorkflowSpec(name="e")).violations[0].field == "spec.actions"


@pytest.mark.parametrize("bad", ["../x", "a\x01b", "x" * 129, "", "-lead"])
def test_bad_ids_name_the_field(bad: str) -> None:
    err = refused(spec((bad, [])))
    assert err.violations[0].field == "spec.actions[0].id"


def test_limits_name_the_limit_and_value() -> None:
    err = refused(spec(("a", []), ("b", []), ("c", [])), Limits(max_actions=2))
    assert "max_actions is 2" in err.message
    err = refused(spec(("a", []), ("b", []), ("c", ["a", "b"])), Limits(max_fan_in=1))
    assert "max_fan_in is 1" in err.message
    err = refused(spec(("a", []), ("b", ["a"]), ("c", ["b"])), Limits(max_depth=2))
    assert "max_depth is 2" in err.message


def test_timeout_and_attempts_ranges() -> None:
    s = spec(("a", []))
    s.actions[0].timeout.FromMilliseconds(0)
    s.actions[0].retry.max_attempts = 101
    err = refused(s)
    fields = {v.field for v in err.violations}
    assert fields == {"spec.actions[0].timeout", "spec.actions[0].retry.max_attempts"}


def test_input_must_be_json_within_limit() -> None:
    s = spec(("a", []))
    s.actions[0].input_json = "{nope"
    assert refused(s).violations[0].field == "spec.actions[0].input_json"
    s.actions[0].input_json = '"' + "x" * 100 + '"'
    assert "max_input_bytes is 10" in refused(s, Limits(max_input_bytes=10)).message


def test_exec_or_handler_required() -> None:
    s = pb.WorkflowSpec(name="t")
    s.actions.add(id="a")
    assert "exactly one of exec or handler" in refused(s).message


def test_deep_chain_does_not_recurse() -> None:
    n = 5000
    validate_submit(spec(*[(f"a{i}", [f"a{i - 1}"] if i else []) for i in range(n)]), "", Limits())


def test_a_long_cycle_is_named_by_its_ends_and_counted() -> None:
    n = 768
    err = refused(spec(*((f"a{i}", [f"a{(i - 1) % n}"]) for i in range(n))))
    (v,) = err.violations
    assert v.description.startswith(f"cycle of {n} actions: ")
    assert "more)" in v.description and len(v.description) < 1000
    ids = [p for p in v.description.split(": ", 1)[1].split(" -> ") if not p.startswith("…")]
    assert len(ids) == 16 and ids[0] == ids[-1]
