"""YAML workflow loader and the Workflow builder (plait.spec)."""

from __future__ import annotations

import json
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from plait import Workflow, load_workflow
from plait.errors import InvalidArgumentError
from plait.spec import (
    ACTION_KEYS,
    WORKFLOW_DIR_ENV,
    ActionRef,
    SpecError,
    loads_workflow,
    spec_from_dict,
)
from plait.v1 import workflow_pb2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> SpecError:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    return info.value


FULL = """
    name: thumbnails
    labels: {team: media, version: 2}
    defaults:
      retry: {max_attempts: 3, backoff: 1s, max_backoff: 30s, multiplier: 1.5,
              retryable_exit_codes: [75]}
      timeout: 5m
    actions:
      - id: list
        run: [python3, list_images.py, 3]
        env: {THREADS: 4, MODE: fast}
        input: {dir: /srv/images, n: [1, 2.5, null, true]}
      - id: resize
        needs: list
        run: convert "$IN" -resize 256x256 out.png
        timeout: 250ms
        retry: {max_attempts: 5, backoff: 2s, max_backoff: 1m, multiplier: 3,
                retryable_exit_codes: 1}
        slots: 2
        selector: {gpu: "true", zone: eu}
      - id: index
        needs: [list, resize]
        handler: build-index
        input: 42
"""


def test_every_key_maps_onto_the_spec(tmp_path: Path) -> None:
    spec = load_workflow(write(tmp_path, FULL))
    assert spec.name == "thumbnails"
    assert dict(spec.labels) == {"team": "media", "version": "2"}
    d = spec.defaults
    assert d.retry.max_attempts == 3
    assert d.retry.initial_backoff.ToTimedelta() == timedelta(seconds=1)
    assert d.retry.max_backoff.ToTimedelta() == timedelta(seconds=30)
    assert d.retry.backoff_multiplier == 1.5
    assert list(d.retry.retryable_exit_codes) == [75]
    assert d.timeout.ToTimedelta() == timedelta(minutes=5)

    listing, resize, index = spec.actions
    assert listing.id == "list"
    assert list(listing.needs) == []
    assert listing.WhichOneof("kind") == "exec"
    assert list(listing.exec.argv) == ["python3", "list_images.py", "3"]
    assert not listing.exec.shell
    assert json.loads(listing.input_json) == {"dir": "/srv/images", "n": [1, 2.5, None, True]}
    assert listing.env["THREADS"] == "4"
    assert listing.env["MODE"] == "fast"
    assert not listing.HasField("timeout")
    assert not listing.HasField("retry")
    assert listing.slots == 0

    assert list(resize.needs) == ["list"]
    assert list(resize.exec.argv) == ['convert "$IN" -resize 256x256 out.png']
    assert resize.exec.shell
    assert resize.timeout.ToTimedelta() == timedelta(milliseconds=250)
    assert resize.retry.max_attempts == 5
    assert resize.retry.initial_backoff.ToTimedelta() == timedelta(seconds=2)
    assert resize.retry.max_backoff.ToTimedelta() == timedelta(minutes=1)
    assert resize.retry.backoff_multiplier == 3
    assert list(resize.retry.retryable_exit_codes) == [1]
    assert resize.slots == 2
    assert dict(resize.selector) == {"gpu": "true", "zone": "eu"}
    assert resize.input_json == ""

    assert index.WhichOneof("kind") == "handler"
    assert index.handler == "build-index"
    assert list(index.needs) == ["list", "resize"]
    assert index.input_json == "42"
    assert WORKFLOW_DIR_ENV not in index.env  # handlers get no env


def test_exec_actions_get_the_workflow_dir(tmp_path: Path) -> None:
    # Once, in the workflow's env (the coordinator adds it to each exec lease), not per action.
    spec = load_workflow(write(tmp_path, FULL))
    assert spec.env[WORKFLOW_DIR_ENV] == str(tmp_path.resolve())
    assert not any(WORKFLOW_DIR_ENV in a.env for a in spec.actions)
    own = load_workflow(
        write(tmp_path, f"actions: [{{id: a, run: [x], env: {{{WORKFLOW_DIR_ENV}: /mine}}}}]\n")
    )
    assert own.actions[0].env[WORKFLOW_DIR_ENV] == "/mine"  # the action's own wins at grant
    top = load_workflow(
        write(tmp_path, f"env: {{{WORKFLOW_DIR_ENV}: /top}}\nactions: [{{id: a, run: [x]}}]\n")
    )
    assert top.env[WORKFLOW_DIR_ENV] == "/top"
    text = loads_workflow("actions: [{id: a, run: [x]}]")
    assert WORKFLOW_DIR_ENV not in text.env and WORKFLOW_DIR_ENV not in text.actions[0].env


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    spec = load_workflow(write(tmp_path, "actions: [{id: a, run: [true]}]\n", "nightly.yaml"))
    assert spec.name == "nightly"


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    spec = load_workflow(
        write(
            tmp_path,
            """
            actions:
              - &w {id: w0, run: [work], timeout: 2s}
              - {<<: *w, id: w1}
            """,
        )
    )
    assert [a.id for a in spec.actions] == ["w0", "w1"]
    assert spec.actions[1].timeout.seconds == 2


@pytest.mark.parametrize(
    ("body", "field", "human", "fragment"),
    [
        (
            "  - id: resize\n    run: [x]\n    timeout: soon\n",
            "actions[2].timeout",
            "actions[2] (id 'resize'): timeout:",
            "expected a duration such as 250ms, 2s or 5m, got 'soon'",
        ),
        (
            "  - id: resize\n    run: [x]\n    timeout: 0s\n",
            "actions[2].timeout",
            "actions[2] (id 'resize'): timeout:",
            "greater than zero",
        ),
        (
            "  - id: resize\n    run: [x]\n    speculate: soon\n",
            "actions[2].speculate",
            "actions[2] (id 'resize'): speculate:",
            "expected a duration",
        ),
        (
            "  - id: resize\n    run: [x]\n    pipeline: {}\n",
            "actions[2].pipeline",
            "actions[2] (id 'resize'): pipeline:",
            "a pipeline runs its stages",
        ),
        (
            "  - id: resize\n    run: [x]\n    command: [y]\n",
            "actions[2].command",
            "actions[2] (id 'resize'): command:",
            "unknown key 'command'; allowed action keys: " + ", ".join(ACTION_KEYS),
        ),
        (
            "  - id: resize\n    run: [x]\n    handler: h\n",
            "actions[2].run",
            "actions[2] (id 'resize'): run:",
            "exactly one of run or handler is required, got both",
        ),
        (
            "  - id: resize\n",
            "actions[2].run",
            "actions[2] (id 'resize'): run:",
            "exactly one of run or handler is required, got neither",
        ),
        (
            "  - id: resize\n    run: []\n",
            "actions[2].run",
            "actions[2] (id 'resize'): run:",
            "empty list",
        ),
        (
            "  - id: resize\n    run: {a: 1}\n",
            "actions[2].run",
            "actions[2] (id 'resize'): run:",
            "expected a list (argv) or a string",
        ),
        (
            "  - id: resize\n    run: [x, [y]]\n",
            "actions[2].run[1]",
            "actions[2] (id 'resize'): run[1]:",
            "expected a string, got a list",
        ),
        (
            "  - id: resize\n    handler: ''\n",
            "actions[2].handler",
            "actions[2] (id 'resize'): handler:",
            "expected a handler name",
        ),
        (
            "  - id: resize\n    run: [x]\n    needs: 3\n",
            "actions[2].needs",
            "actions[2] (id 'resize'): needs:",
            "expected an action id or a list of ids",
        ),
        (
            "  - id: resize\n    run: [x]\n    needs: [a, a]\n",
            "actions[2].needs[1]",
            "actions[2] (id 'resize'): needs[1]:",
            "listed twice",
        ),
        (
            "  - id: resize\n    run: [x]\n    needs: [nope]\n",
            "actions[2].needs[0]",
            "actions[2] (id 'resize'): needs[0]:",
            "unknown action id 'nope'",
        ),
        (
            "  - id: resize\n    run: [x]\n    needs: resize\n",
            "actions[2].needs[0]",
            "actions[2] (id 'resize'): needs[0]:",
            "cannot need itself",
        ),
        (
            "  - id: a\n    run: [x]\n",
            "actions[2].id",
            "actions[2] (id 'a'): id:",
            "duplicate id; first used by actions[0]",
        ),
        (
            "  - run: [x]\n",
            "actions[2].id",
            "actions[2]: id:",
            "is required",
        ),
        (
            "  - id: ../etc\n    run: [x]\n",
            "actions[2].id",
            "actions[2] (id '../etc'): id:",
            "[A-Za-z0-9_.-]",
        ),
        (
            "  - id: resize\n    run: [x]\n    env: {A: [1]}\n",
            "actions[2].env.A",
            "actions[2] (id 'resize'): env.A:",
            "expected a string, got a list",
        ),
        (
            "  - id: resize\n    run: [x]\n    env: [A]\n",
            "actions[2].env",
            "actions[2] (id 'resize'): env:",
            "expected a mapping",
        ),
        (
            "  - id: resize\n    run: [x]\n    selector: {gpu: {a: b}}\n",
            "actions[2].selector.gpu",
            "actions[2] (id 'resize'): selector.gpu:",
            "expected a string",
        ),
        (
            "  - id: resize\n    run: [x]\n    slots: 0\n",
            "actions[2].slots",
            "actions[2] (id 'resize'): slots:",
            "between 1 and",
        ),
        (
            "  - id: resize\n    run: [x]\n    slots: two\n",
            "actions[2].slots",
            "actions[2] (id 'resize'): slots:",
            "expected a whole number",
        ),
        (
            "  - id: resize\n    run: [x]\n    input: 2024-01-01\n",
            "actions[2].input",
            "actions[2] (id 'resize'): input:",
            "expected a JSON value",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: 3\n",
            "actions[2].retry",
            "actions[2] (id 'resize'): retry:",
            "expected a mapping with keys max_attempts",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {max_attempts: 101}\n",
            "actions[2].retry.max_attempts",
            "actions[2] (id 'resize'): retry.max_attempts:",
            "between 1 and 100",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {max_attempts: true}\n",
            "actions[2].retry.max_attempts",
            "actions[2] (id 'resize'): retry.max_attempts:",
            "expected a whole number",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {backoff: fast}\n",
            "actions[2].retry.backoff",
            "actions[2] (id 'resize'): retry.backoff:",
            "expected a duration",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {max_backoff: -1s}\n",
            "actions[2].retry.max_backoff",
            "actions[2] (id 'resize'): retry.max_backoff:",
            "expected a duration",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {multiplier: 0.5}\n",
            "actions[2].retry.multiplier",
            "actions[2] (id 'resize'): retry.multiplier:",
            "must be >= 1",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {retryable_exit_codes: [1, x]}\n",
            "actions[2].retry.retryable_exit_codes[1]",
            "actions[2] (id 'resize'): retry.retryable_exit_codes[1]:",
            "expected a whole number",
        ),
        (
            "  - id: resize\n    run: [x]\n    retry: {jitter: 2}\n",
            "actions[2].retry.jitter",
            "actions[2] (id 'resize'): retry.jitter:",
            "must be from 0 to 1",
        ),
        (
            "  - just a string\n",
            "actions[2]",
            "actions[2]:",
            "expected a mapping",
        ),
    ],
)
def test_each_error_names_file_action_and_field(
    tmp_path: Path, body: str, field: str, human: str, fragment: str
) -> None:
    text = "name: t\nactions:\n  - id: a\n    run: [x]\n  - id: b\n    run: [x]\n" + body
    err = load_error(tmp_path, text)
    assert isinstance(err, InvalidArgumentError)
    assert field in [v.field for v in err.violations], err.violations
    line = next(line for line in err.lines if human in line)
    assert line.startswith(f"{tmp_path / 'flow.yaml'}: {human}")
    assert fragment in line
    assert str(tmp_path / "flow.yaml") in str(err)


def test_the_message_reads_as_in_the_docs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "actions:\n  - {id: a, run: [x]}\n  - {id: b, run: [x]}\n"
        "  - {id: resize, run: [x], timeout: soon}\n",
    )
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    assert str(info.value) == (
        f"{path}: actions[2] (id 'resize'): timeout: expected a duration such as 250ms, 2s or 5m,"
        " got 'soon'"
    )


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("name: t\nactions: [{id: a, run: [x]}]\nmap: x\n", "map", "unknown key 'map'"),
        (
            "name: t\nactions: [{id: a, run: [x]}]\nversion: 2\n",
            "version",
            "allowed top-level keys: name, defaults, labels, fail_fast, max_parallel, deadline,"
            " priority, env, actions",
        ),
        ("name: t\n", "actions", "non-empty list"),
        ("name: t\nactions: []\n", "actions", "non-empty list"),
        ("name: ''\nactions: [{id: a, run: [x]}]\n", "name", "1 to 128 characters"),
        (
            "actions: [{id: a, run: [x]}]\ndefaults: {timeout: never}\n",
            "defaults.timeout",
            "expected a duration",
        ),
        (
            "actions: [{id: a, run: [x]}]\ndefaults: {retry: {tries: 3}}\n",
            "defaults.retry.tries",
            "unknown key 'tries'",
        ),
        (
            "actions: [{id: a, run: [x]}]\ndefaults: {parallel: 3}\n",
            "defaults.parallel",
            "allowed defaults keys: retry, timeout",
        ),
        ("actions: [{id: a, run: [x]}]\nlabels: [a]\n", "labels", "expected a mapping"),
        ("- a\n- b\n", "", "expected a mapping"),
    ],
)
def test_top_level_errors(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    err = load_error(tmp_path, text)
    assert field in [v.field for v in err.violations]
    assert fragment in str(err)
    assert str(err).startswith(str(tmp_path / "flow.yaml") + ": ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        "actions:\n  - {id: a, run: [x], timeout: soon, slots: 0}\n  - {id: b, handler: 3}\n",
    )
    assert {v.field for v in err.violations} == {
        "actions[0].timeout",
        "actions[0].slots",
        "actions[1].handler",
    }
    assert len(str(err).splitlines()) == 3


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "actions:\n  - id: a\n   run: [x\n")
    assert "invalid YAML: line" in str(err)
    assert str(err).startswith(str(tmp_path / "flow.yaml"))


def test_repeated_key_is_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, "actions:\n  - id: a\n    run: [x]\n    run: [y]\n")
    assert "'run' appears twice" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_workflow(tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read" in str(info.value)


def test_spec_from_dict_names_its_source() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({"actions": [{"id": "a"}]}, source="api")
    assert str(info.value).startswith("api: actions[0] (id 'a'): run:")


@pytest.mark.parametrize("name", ["scatter_gather.yaml", "handlers.yaml"])
def test_examples_load(name: str) -> None:
    spec = load_workflow(EXAMPLES / name)
    ids = [a.id for a in spec.actions]
    assert len(ids) == len(set(ids)) >= 6
    fan_in = max(len(a.needs) for a in spec.actions)
    assert fan_in >= 4  # a join


# -- builder ------------------------------------------------------------------------------


def test_builder_matches_yaml(tmp_path: Path) -> None:
    wf = Workflow(
        "thumbnails",
        defaults={
            "retry": {
                "max_attempts": 3,
                "backoff": "1s",
                "max_backoff": "30s",
                "multiplier": 1.5,
                "retryable_exit_codes": [75],
            },
            "timeout": "5m",
        },
        labels={"team": "media", "version": "2"},
    )
    listing = wf.exec(
        "list",
        ["python3", "list_images.py", "3"],
        env={"THREADS": "4", "MODE": "fast"},
        input={"dir": "/srv/images", "n": [1, 2.5, None, True]},
    )
    resize = wf.exec(
        "resize",
        'convert "$IN" -resize 256x256 out.png',
        needs=listing,
        timeout="250ms",
        retry={
            "max_attempts": 5,
            "backoff": "2s",
            "max_backoff": "1m",
            "multiplier": 3,
            "retryable_exit_codes": 1,
        },
        slots=2,
        selector={"gpu": "true", "zone": "eu"},
    )
    index = wf.handler("index", "build-index", needs=[listing, resize], input=42)
    assert index == ActionRef("index")
    assert str(index) == "index"
    built = wf.to_spec()
    loaded = loads_workflow(textwrap.dedent(FULL))
    assert built == loaded


def test_builder_shell_joins_argv() -> None:
    wf = Workflow("w")
    wf.exec("a", ["echo", "hi", "|", "wc"], shell=True)
    action = wf.to_spec().actions[0]
    assert action.exec.shell
    assert list(action.exec.argv) == ["echo hi | wc"]


def test_builder_fails_at_the_bad_call() -> None:
    wf = Workflow("w")
    wf.exec("a", ["x"])
    with pytest.raises(SpecError) as info:
        wf.exec("b", ["y"], timeout="soon")
    assert str(info.value) == (
        "Workflow('w'): actions[1] (id 'b'): timeout: expected a duration such as 250ms, 2s or"
        " 5m, got 'soon'"
    )
    with pytest.raises(SpecError, match="expected a duration"):
        wf.exec("c", ["y"], speculate="soon")
    with pytest.raises(SpecError, match=r"defaults\.timeout"):
        Workflow("w", defaults={"timeout": "x"})
    # The refused calls added nothing.
    assert [a.id for a in wf.to_spec().actions] == ["a"]


def test_builder_checks_needs_at_to_spec() -> None:
    wf = Workflow("w")
    wf.exec("a", ["x"], needs=["ghost"])
    with pytest.raises(SpecError, match=r"actions\[0\] \(id 'a'\): needs\[0\]: unknown action id"):
        wf.to_spec()


def test_builder_accepts_none_options() -> None:
    wf = Workflow("w")
    wf.handler("a", "h", needs=None, timeout=None)
    spec = wf.to_spec()
    assert spec.actions[0] == workflow_pb2.ActionSpec(id="a", handler="h")
