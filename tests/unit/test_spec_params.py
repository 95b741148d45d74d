"""Workflow parameters: a ``params:`` section, ``${params.NAME}`` references, values from ``-p``
and ``--input-file`` (plait.spec.params, plait.cli.flows).

Values are applied on the client when the file loads, so the spec holds them resolved; a
parameter given but not declared, a required one missing, a value of the wrong type and a
reference to an undeclared name each fail the load naming the parameter (the CLI exits 2).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import yaml

from plait.cli.main import main
from plait.spec import SpecError, loads_workflow
from plait.spec.files import load_params_file, load_workflow
from plait.spec.params import apply_params, parse_assignment

FLOW = """
name: report-${params.date}
params:
  date: {description: the day to process}
  width: {default: 4}
  region: eu-west-1
  dry_run: {type: boolean, default: false}
  shards: {default: [a, b]}
max_parallel: ${params.width}
labels: {region: "${params.region}"}
actions:
  - id: report
    run: [report.py, --date, "${params.date}", --width, "${params.width}",
          --dry, "${params.dry_run}"]
    input: {shards: "${params.shards}", note: "shards ${params.shards}", literal: "$${params.date}"}
    env: {REGION: "${params.region}"}
"""


def load(text: str = FLOW, **params: object) -> object:
    return loads_workflow(text, source="flow.yaml", params=params)


def problems(text: str = FLOW, **params: object) -> list[str]:
    with pytest.raises(SpecError) as err:
        loads_workflow(text, source="flow.yaml", params=params)
    return err.value.lines


def test_values_are_applied_typed_where_whole_and_as_text_inside_strings() -> None:
    spec = loads_workflow(FLOW, source="flow.yaml", params={"date": "2026-12-01", "width": "8"})
    assert spec.name == "report-2026-12-01"
    assert spec.max_parallel == 8  # "-p width=8" read as the declared integer
    assert spec.labels["region"] == "eu-west-1"  # the default
    (a,) = spec.actions
    assert list(a.exec.argv) == [
        "report.py",
        "--date",
        "2026-12-01",
        "--width",
        "8",
        "--dry",
        "false",
    ]
    assert json.loads(a.input_json) == {
        "shards": ["a", "b"],  # whole: the list itself
        "note": 'shards ["a","b"]',  # inside a string: compact JSON
        "literal": "${params.date}",  # $$ escapes a reference
    }
    assert a.env["REGION"] == "eu-west-1"


def test_typed_values_from_a_file_or_python_are_kept() -> None:
    spec = loads_workflow(
        FLOW,
        source="flow.yaml",
        params={"date": "d", "width": 2, "dry_run": True, "shards": ["x"]},
    )
    assert spec.max_parallel == 2
    assert json.loads(spec.actions[0].input_json)["shards"] == ["x"]
    assert spec.actions[0].exec.argv[-1] == "true"


def test_a_required_parameter_must_be_given() -> None:
    assert problems() == [
        "flow.yaml: params.date: required parameter not given (-p date=VALUE or --input-file)"
    ]


def test_an_undeclared_value_is_refused_naming_it_and_the_declared_ones() -> None:
    lines = problems(date="d", colour="red")
    assert lines == [
        "flow.yaml: parameter colour: unknown parameter 'colour'; the workflow declares:"
        " date, width, region, dry_run, shards"
    ]


def test_a_reference_to_an_undeclared_name_names_where_it_is() -> None:
    text = FLOW.replace('REGION: "${params.region}"', 'REGION: "${params.regoin}"')
    (line,) = problems(text, date="d")
    assert line.startswith(
        "flow.yaml: actions[0] (id 'report'): env.REGION: ${params.regoin}: unknown parameter"
        " 'regoin'"
    )


def test_a_value_of_the_wrong_type_names_the_parameter() -> None:
    assert problems(date="d", width="wide") == [
        "flow.yaml: parameter width: expected an integer, got 'wide'"
    ]
    assert problems(date="d", dry_run="maybe") == [
        "flow.yaml: parameter dry_run: expected a boolean, got 'maybe'"
    ]
    assert problems(date="d", shards={"not": "a list"}) == [
        "flow.yaml: parameter shards: expected a list, got a mapping"
    ]


def test_a_bad_declaration_is_reported() -> None:
    text = "params:\n  n: {type: int, default: 1}\n  'bad name': 1\n  m: {defualt: 2}\n" + (
        "actions: [{id: a, run: 'true'}]\n"
    )
    lines = problems(text)
    assert any("params.n.type: expected one of string, integer" in x for x in lines), lines
    assert any("params.bad name: expected a name" in x for x in lines), lines
    assert any("params.m.defualt: unknown key 'defualt'" in x for x in lines), lines


def test_a_file_without_params_refuses_values_and_references() -> None:
    plain = "actions: [{id: a, run: 'true'}]\n"
    assert loads_workflow(plain).actions[0].id == "a"
    (line,) = problems(plain, x="1")
    assert "unknown parameter 'x'; the workflow declares: none" in line
    (line,) = problems("actions: [{id: a, run: 'echo ${params.x}'}]\n")
    assert "actions[0] (id 'a'): run: ${params.x}: unknown parameter 'x'" in line


def test_the_spec_keeps_nothing_of_the_params_section() -> None:
    text = str(loads_workflow(FLOW, params={"date": "d"}))
    assert text.count("${params.date}") == 1  # the escaped literal, and nothing else:
    assert "params" not in text.replace("${params.date}", "")
    assert "${" not in text.replace("${params.date}", "")


def test_shell_variables_are_left_alone() -> None:
    spec = loads_workflow("actions: [{id: a, run: 'echo ${HOME} $PATH'}]\n")
    assert spec.actions[0].exec.argv[0] == "echo ${HOME} $PATH"


def test_a_file_that_mentions_no_parameter_is_not_walked() -> None:
    # The fast path a 100,000-action file takes: the document comes back as it is.
    text = "actions:\n" + "".join(f"  - {{id: a{i}, run: 'true'}}\n" for i in range(100))
    doc = yaml.safe_load(text)
    assert apply_params(doc, "flow.yaml", None, text=text) is doc
    declared = {"params": {"x": 1}, **doc}
    resolved = apply_params(declared, "flow.yaml", None, text="params" + text)
    assert resolved == doc and resolved is not declared


def test_yaml_dates_are_strings_to_a_string_parameter() -> None:
    text = "params: {day: 2026-01-31}\nactions: [{id: a, run: 'echo ${params.day}'}]\n"
    assert loads_workflow(text).actions[0].exec.argv == ["echo 2026-01-31"]
    given = {"day": datetime.date(2026, 2, 1)}  # what a YAML --input-file gives
    assert loads_workflow(text, params=given).actions[0].exec.argv == ["echo 2026-02-01"]


def test_assignments_split_at_the_first_equals() -> None:
    assert parse_assignment("q=a=b") == ("q", "a=b")
    assert parse_assignment("empty=") == ("empty", "")
    for bad in ("novalue", "=x"):
        with pytest.raises(ValueError, match="expected NAME=VALUE"):
            parse_assignment(bad)


def test_a_params_file_must_be_a_mapping(tmp_path: Path) -> None:
    good = tmp_path / "p.json"
    good.write_text('{"date": "2026-12-01", "width": 3}')
    assert load_params_file(good) == {"date": "2026-12-01", "width": 3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: expected a mapping of parameter names"):
        load_params_file(bad)
    with pytest.raises(SpecError, match=r"missing\.yaml: cannot read"):
        load_params_file(tmp_path / "missing.yaml")


def test_load_workflow_takes_params(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    assert load_workflow(flow, params={"date": "x"}).name == "report-x"


# The CLI: -p and --input-file on validate (the same loader as submit and run) -------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cli_p_wins_over_the_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = write(tmp_path, "flow.yaml", FLOW)
    values = write(tmp_path, "values.yaml", "date: 2026-01-01\nwidth: 3\n")
    code = main(["validate", flow, "--input-file", values, "-p", "date=2026-02-02", "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["name"] == "report-2026-02-02"


def test_cli_errors_name_the_flag_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = write(tmp_path, "flow.yaml", FLOW)
    assert main(["validate", flow, "-p", "date=d", "-p", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert f"plait: error: {flow}: -p colour: unknown parameter 'colour'" in err
    assert main(["validate", flow, "-p", "date"]) == 2
    assert "plait: error: -p: expected NAME=VALUE, got 'date'" in capsys.readouterr().err
    assert main(["validate", flow]) == 2
    assert "params.date: required parameter not given" in capsys.readouterr().err
    values = write(tmp_path, "values.yaml", "date: d\nwidth: wide\n")
    assert main(["validate", flow, "--input-file", values]) == 2
    err = capsys.readouterr().err
    assert f"--input-file {values}: width: expected an integer, got 'wide'" in err
