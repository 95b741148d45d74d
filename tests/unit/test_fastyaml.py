"""The libyaml loader (plait.spec.fastyaml) gives what the pure-Python safe loader gives, and
refuses what it refuses: repeated keys, deep nesting, alias bombs, recursive aliases, unsafe
tags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plait.spec import fastyaml
from plait.spec import files as spec_files

pytestmark = pytest.mark.skipif(not fastyaml.AVAILABLE, reason="PyYAML without libyaml")

ROOT = Path(__file__).resolve().parents[2]

DOCS = [
    "a: 1\nb: [true, false, ~, null, 1.5, 0x1f, 1_000, '7', \"x\", 2026-12-01]\nc: {d: e}\n",
    "defaults: &d {retry: {max_attempts: 3}, timeout: 5m}\n"
    "actions:\n  - <<: *d\n    id: a\n    timeout: 1m\n  - {<<: [*d], id: b}\n",
    "x: &s shared\ny: *s\nz: [*s, *s]\n",
    "- |\n  block\n  text\n- >\n  folded\n  text\n- on\n- off\n- yes\n- 1:30\n",
    "empty_map: {}\nempty_list: []\nnothing:\n",
    "'quoted key': 1\n? complex\n: value\n",
    "",
]


def slow(text: str) -> object:
    return yaml.load(text, Loader=spec_files._UniqueKeyLoader)


def fast(text: str) -> object:
    return fastyaml.load(
        text,
        max_depth=spec_files.MAX_YAML_DEPTH,
        max_alias_nodes=spec_files.MAX_YAML_ALIAS_NODES,
    )


@pytest.mark.parametrize("text", DOCS)
def test_the_same_values_as_the_safe_loader(text: str) -> None:
    assert fast(text) == slow(text)


def test_every_example_loads_the_same() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text()
        assert fast(text) == slow(text), path.name


def test_an_alias_is_the_same_object() -> None:
    doc = fast("a: &x [1]\nb: *x\n")
    assert isinstance(doc, dict) and doc["a"] is doc["b"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\nb: 2\na: 3\n", "key 'a' appears twice in one mapping"),
        ("x: " + "[" * 150 + "]" * 150 + "\n", "nested more than 100 levels deep"),
        ("x: &a [*a]\n", "recursive alias"),
        ("x: !!python/object:os.system {}\n", "could not determine a constructor"),
        ("a: [1, 2\n", "expected ',' or ']'"),
    ],
)
def test_the_same_refusals(text: str, problem: str) -> None:
    with pytest.raises(yaml.YAMLError, match=problem):
        fast(text)
    with pytest.raises(yaml.YAMLError):
        slow(text)


def test_an_alias_bomb_is_refused_without_being_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(yaml.YAMLError, match="aliases expand to more than 1,000,000 nodes"):
        fast("\n".join(lines) + "\n")


def test_a_very_deep_document_is_refused_before_libyaml_recurses() -> None:
    # Far deeper than a C stack could compose recursively: refused by our count at level 101,
    # or by libyaml's own bound (1,000 levels) while it scans ahead: never composed.
    with pytest.raises(yaml.YAMLError, match=r"more than 100 levels deep|maximum nesting depth"):
        fast("[" * 500_000 + "]" * 500_000)
    with pytest.raises(yaml.YAMLError, match="more than 100 levels deep"):
        fast("x:\n" + "".join(" " * i + "- \n" for i in range(150)))


# -- JSON, which is YAML -------------------------------------------------------------------


def json_or_none(text: str) -> object:
    doc = fastyaml.load_json(text, max_depth=spec_files.MAX_YAML_DEPTH)
    return None if doc is fastyaml.NOT_JSON else doc


def test_json_reads_as_the_yaml_loader_reads_it() -> None:
    import json

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = json.dumps(slow(path.read_text()))
        assert json_or_none(text) == slow(text), path.name
    text = '{"a": [1, -0, 0.5, 1.5e+3, true, null, "x\\/y\\u00e9"], "b": {"c": {}}}'
    assert json_or_none(text) == slow(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1e3}',  # a string to YAML 1.1
        '{"a": 1.5e3}',
        '{"a": NaN}',
        '{"a": "\\ud83d\\ude00"}',  # PyYAML keeps the two halves
        '{"a": 1, "a": 2}',  # the YAML loader names the repeated key
        '{"a": "\u0085\u007f"}',  # characters PyYAML's reader refuses
        "[" * 100 + "]" * 100,  # past the nesting limit (the scalar level counted)
        '{"a": 1',
    ],
)
def test_json_that_might_read_otherwise_is_left_to_yaml(text: str) -> None:
    assert json_or_none(text) is None


def test_loads_workflow_takes_json_and_yaml_alike() -> None:
    from plait.spec import loads_workflow

    as_yaml = loads_workflow("actions: [{id: a, run: [true], needs: []}]\n")
    as_json = loads_workflow('{"actions": [{"id": "a", "run": [true], "needs": []}]}')
    assert as_json == as_yaml
    with pytest.raises(Exception, match="'a' appears twice"):
        loads_workflow('{"actions": [{"id": "a", "run": ["x"]}], "a": 1, "a": 2}')
