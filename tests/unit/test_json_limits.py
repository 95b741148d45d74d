"""JSON size and nesting limits (plait.jsonlimits) and where the coordinator applies them.

The depth check never parses; it is compared here with a reference that does (a character
tokenizer), over generated documents whose strings are full of brackets, quotes and escapes.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.coordinator.config import LIMIT_FLAGS, Limits, load_config, parse_args
from plait.coordinator.core.results import check_outputs
from plait.coordinator.core.state import CoreConfig
from plait.errors import ConfigError, InvalidArgumentError
from plait.jsonlimits import (
    MAX_JSON_DEPTH,
    JsonLimitError,
    json_problem,
    loads_bounded,
    nesting_exceeds,
    utf8_len,
)
from plait.spec.validate import validate_submit
from plait.v1 import workflow_pb2 as pb

MiB = 1 << 20


def reference_depth(text: str) -> int:
    """Deepest nesting of arrays and objects, brackets in strings not counted (a tokenizer)."""
    depth = best = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# Strings that try to confuse a bracket counter: brackets, quotes, backslashes, escapes.
tricky_text = st.text(alphabet='[]{}"\\/ab\n\x00é', max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=60,
)


@settings(
    max_examples=300, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(json_values, st.integers(min_value=0, max_value=80), st.integers(min_value=0, max_value=8))
def test_depth_matches_a_parsing_reference(value: object, wrap: int, limit: int) -> None:
    text = "[" * wrap + json.dumps(value, ensure_ascii=False) + "]" * wrap
    want = reference_depth(text)

    for max_depth in (limit, want - 1, want, want + 1, MAX_JSON_DEPTH):
        if max_depth >= 0:
            assert nesting_exceeds(text, max_depth) == (want > max_depth), (text, max_depth)


@settings(max_examples=200, derandomize=True, database=None)
@given(st.text(alphabet='[]{}"\\ ,1', max_size=300))
def test_any_text_gets_an_answer_and_nothing_raises(text: str) -> None:
    nesting_exceeds(text, 3)
    problem = json_problem(text, max_bytes=1000, bytes_limit="max_x_bytes", max_depth=3)
    if reference_depth(text) <= 3 and text.count("[") + text.count("{") <= 3:
        assert problem is None or "max_json_depth" not in problem


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        (nested(64), 64),
        (nested(65), 65),
        # Closers in strings must not hide real nesting: '["]",' per level looks flat.
        ('["]",' * 100 + "1" + "]" * 100, 100),
        # Openers in strings must not add any.
        ('["' + "[" * 500 + '"]', 1),
        # Escaped quotes do not end a string, escaped backslashes do not escape the quote.
        ('["\\"[[[[[[", "\\\\", [[]]]', 3),
        # Many narrow nests (the prefix-sum path), one level too deep.
        ("[" + ",".join([nested(64)] * 200) + "]", 65),
        ("[" + ",".join([nested(63)] * 200) + "]", 64),
    ],
)
def test_known_depths(text: str, depth: int) -> None:
    assert reference_depth(text) == depth
    assert nesting_exceeds(text, depth - 1) if depth else True
    assert not nesting_exceeds(text, depth)


def test_the_issue_documents_are_refused_without_recursion() -> None:
    deep = nested(100_000)

    assert nesting_exceeds(deep)
    problem = json_problem(deep, max_bytes=MiB, bytes_limit="max_output_bytes")
    assert problem == "nests more than 64 levels deep; the limit max_json_depth is 64"
    with pytest.raises(JsonLimitError, match="max_json_depth is 64"):
        loads_bounded(deep, max_bytes=MiB)
    # Unterminated, unbalanced or garbage: still an answer, never a RecursionError.
    for text in ("[" * 100_000, '["' + '\\"' * 50_000, "]" * 100_000 + "[" * 100_000):
        json_problem(text, max_bytes=MiB, bytes_limit="max_input_bytes")


def test_sizes_are_utf8_bytes_and_name_the_limit() -> None:
    assert utf8_len("abc") == 3
    assert utf8_len("é") == 2
    text = json.dumps({"k": "é" * 600})

    assert json_problem(text, max_bytes=1000, bytes_limit="max_input_bytes") == (
        f"is {len(text.encode())} bytes; the limit max_input_bytes is 1000"
    )
    assert json_problem("[1]", max_bytes=10, bytes_limit="x", want_object=True) == (
        "must be a JSON object, not an array"
    )
    assert (json_problem("{", max_bytes=10, bytes_limit="x") or "").startswith("is not valid JSON")
    assert json_problem("[1]", max_bytes=10, bytes_limit="x") is None


def test_check_outputs_names_the_field_and_the_limit() -> None:
    cfg = CoreConfig()  # the default limits
    assert check_outputs("{}", cfg) is None
    assert check_outputs('{"a": [1]}', cfg) is None
    assert check_outputs(nested(100_000), cfg) == (
        "outputs_json nests more than 64 levels deep; the limit max_json_depth is 64"
    )
    assert "the limit max_output_bytes is 1048576" in (check_outputs(" " * (MiB + 1), cfg) or "")
    assert check_outputs("[]", cfg) == "outputs_json must be a JSON object, not an array"


def submit(action: pb.ActionSpec, limits: Limits | None = None) -> InvalidArgumentError:
    spec = pb.WorkflowSpec(name="w", actions=[action])
    with pytest.raises(InvalidArgumentError) as info:
        validate_submit(spec, "", limits or Limits())
    return info.value


def test_submitted_input_is_capped_in_depth_and_size() -> None:
    err = submit(pb.ActionSpec(id="a", handler="h", input_json=nested(100_000)))

    [v] = err.violations
    assert v.field == "spec.actions[0].input_json"
    assert "max_json_depth is 64" in v.description

    err = submit(pb.ActionSpec(id="a", handler="h", input_json=nested(6)), Limits(max_json_depth=5))
    assert "max_json_depth is 5" in err.violations[0].description


@pytest.mark.parametrize(
    ("action", "field", "names"),
    [
        (pb.ActionSpec(id="a", exec=pb.ExecAction(argv=["x"] * 11)), "exec.argv", "max_argv is 10"),
        (
            pb.ActionSpec(id="a", exec=pb.ExecAction(argv=["x" * 600])),
            "exec.argv",
            "max_argv_bytes is 512",
        ),
        (pb.ActionSpec(id="a", exec=pb.ExecAction(argv=["a\0b"])), "exec.argv[0]", "NUL"),
        (
            pb.ActionSpec(id="a", handler="h", env={f"V{i}": "1" for i in range(11)}),
            "env",
            "max_env is 10",
        ),
        (
            pb.ActionSpec(id="a", handler="h", env={"V": "x" * 600}),
            "env",
            "max_env_bytes is 512",
        ),
        (
            pb.ActionSpec(id="a", handler="h", selector={f"k{i}": "v" for i in range(11)}),
            "selector",
            "max_labels is 10",
        ),
        (
            pb.ActionSpec(id="a", handler="h", selector={"k": "v" * 600}),
            "selector",
            "max_label_bytes is 512",
        ),
        (
            pb.ActionSpec(id="a", handler="h", resources={f"r{i}": 1 for i in range(11)}),
            "resources",
            "max_resources is 10",
        ),
        (
            pb.ActionSpec(
                id="a",
                handler="h",
                semaphores=[pb.SemaphoreRequest(name=f"s{i}") for i in range(11)],
            ),
            "semaphores",
            "max_semaphores is 10",
        ),
        (
            pb.ActionSpec(id="a", handler="h", resources={"gpu": float("nan")}),
            "resources['gpu']",
            "finite",
        ),
        (
            pb.ActionSpec(id="a", handler="h", retry=pb.RetryPolicy(backoff_multiplier=1e10)),
            "retry.backoff_multiplier",
            "between 1 and 1000",
        ),
        (
            pb.ActionSpec(id="a", handler="h", join=pb.JoinPolicy(kind=99)),  # type: ignore[arg-type]
            "join.kind",
            "not a JoinKind",
        ),
    ],
)
def test_caps_name_the_field_and_the_limit(action: pb.ActionSpec, field: str, names: str) -> None:
    small = Limits(
        max_argv=10,
        max_argv_bytes=512,
        max_env=10,
        max_env_bytes=512,
        max_labels=10,
        max_label_bytes=512,
        max_resources=10,
        max_semaphores=10,
    )
    err = submit(action, small)

    assert any(
        v.field == f"spec.actions[0].{field}" and names in v.description for v in err.violations
    ), err.violations


def test_durations_out_of_the_protobuf_range_are_refused() -> None:
    a = pb.ActionSpec(id="a", handler="h")
    a.timeout.seconds = 1 << 62

    [v] = submit(a).violations
    assert v.field == "spec.actions[0].timeout" and "not a valid Duration" in v.description


def test_every_limit_has_a_flag_and_sizes_parse() -> None:
    assert set(LIMIT_FLAGS) == {f.name for f in fields(Limits)}
    cfg = load_config(parse_args(["--max-progress-bytes", "1KiB", "--max-json-depth", "10"]), {})
    assert cfg.limits.max_progress_bytes == 1024 and cfg.limits.max_json_depth == 10
    with pytest.raises(ConfigError, match="max_json_depth"):
        load_config(parse_args(["--max-json-depth", "1000"]), {})
    with pytest.raises(ConfigError, match="max_argv must be >= 1"):
        load_config(parse_args(["--max-argv", "0"]), {})
