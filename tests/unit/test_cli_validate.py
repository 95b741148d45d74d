"""``plait validate FLOW.yaml``: the coordinator's checks, run locally (plait.cli.validate).

One implementation: the coordinator's core runs :func:`plait.spec.validate.validate_submit` on
every submission and ``plait validate`` runs the same function; the client package imports
nothing of the coordinator's to do it. Every problem is a line starting with the file's name;
exit 2 on error, 0 and one summary line when the file is valid.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import plait
from plait.cli.main import main
from plait.coordinator.services import worker as worker_service
from plait.coordinator.services import workflow as workflow_service
from plait.spec import load_workflow
from plait.spec import validate as spec_validate

CLIENT = Path(plait.__file__).parent

VALID = """
name: fan
actions:
  - {id: list, run: 'echo'}
  - {id: each, needs: [list], map: list.items, run: [echo, "{{ item }}"]}
  - {id: a, needs: [list], run: 'true'}
  - {id: b, needs: [list], run: 'true'}
  - {id: done, needs: [each, a, b], join: {at_least: 2}, run: 'true'}
"""

CYCLE = """
actions:
  - {id: a, run: 'true'}
  - {id: b, needs: [a, d], run: 'true'}
  - {id: c, needs: [b], run: 'true'}
  - {id: d, needs: [c], run: 'true'}
"""


def write(tmp_path: Path, text: str, name: str = "flow.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_valid_file_exits_0_with_one_summary_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = write(tmp_path, VALID)
    assert main(["validate", flow]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"{flow}: valid: workflow 'fan', 5 action(s), 6 needs edge(s), 1 map/pipeline,"
        " longest chain 3\n"
    )


def test_a_cycle_is_found_locally_naming_the_file_and_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = write(tmp_path, CYCLE)
    assert main(["validate", flow]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"plait: error: {flow}: actions[1] (id 'b'): needs: cycle: b -> c -> d -> b"]


def test_what_only_the_coordinator_checked_is_found_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The converter passes these; validate_submit (the coordinator's) refuses them.
    flow = write(
        tmp_path,
        'actions:\n  - {id: a, run: ["x\\0y"]}\n'
        "  - {id: b, run: 'true', retry: {retryable_errors: [" + "E" * 300 + "]}}\n",
    )
    assert main(["validate", flow]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        lines[0]
        == f"plait: error: {flow}: actions[0] (id 'a'): exec.argv[0]: contains a NUL character"
    )
    assert lines[1].startswith(f"{flow}: actions[1] (id 'b'): retry.retryable_errors[0]: is longer")
    assert len(lines) == 2


def test_converter_errors_are_reported_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = write(tmp_path, "actions:\n  - {id: a, run: 'true', timeout: soon}\n")
    assert main(["validate", flow]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"plait: error: {flow}: actions[0] (id 'a'): timeout: expected a duration"
    )


def test_json_output_lists_the_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = write(tmp_path, CYCLE)
    assert main(["validate", flow, "-o", "json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False
    assert doc["errors"] == [
        {
            "field": "spec.actions[1].needs",
            "message": f"{flow}: actions[1] (id 'b'): needs: cycle: b -> c -> d -> b",
        }
    ]
    assert main(["validate", write(tmp_path, VALID), "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert (doc["actions"], doc["needs"], doc["longest_chain"]) == (5, 6, 3)


def test_the_size_limits_submit_checks_before_sending_are_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The serialized spec's size is checked on the request (not by validate_submit): validate
    # checks it as submit does before sending, with the same PLAIT_* limits. An input over
    # max_input_bytes is caught by both checks and said once.
    monkeypatch.setenv("PLAIT_MAX_SPEC_BYTES", "2KiB")
    monkeypatch.setenv("PLAIT_MAX_INPUT_BYTES", "100")
    actions = "".join(f"  - {{id: a{i}, run: 'true'}}\n" for i in range(200))
    flow = write(
        tmp_path, f"actions:\n{actions}  - {{id: big, run: 'true', input: {{x: '{'y' * 200}'}}}}\n"
    )
    assert main(["validate", flow]) == 2
    lines = capsys.readouterr().err.strip().removeprefix("plait: error: ").splitlines()
    size = load_workflow(flow).ByteSize()  # with $PLAIT_WORKFLOW_DIR, so it varies
    assert size > 2048
    assert [line for line in lines if "max_spec_bytes" in line] == [
        f"{flow}: spec: is {size:,} bytes serialized; the limit max_spec_bytes is 2,048"
    ]
    assert len([line for line in lines if "max_input_bytes" in line]) == 1, lines
    monkeypatch.delenv("PLAIT_MAX_SPEC_BYTES")
    monkeypatch.delenv("PLAIT_MAX_INPUT_BYTES")
    assert main(["validate", flow]) == 0


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read" in capsys.readouterr().err


def test_the_coordinator_runs_the_same_function() -> None:
    assert worker_service.labels_violations is spec_validate.labels_violations
    assert workflow_service.validate_submit is spec_validate.validate_submit


def test_the_client_package_imports_nothing_of_the_coordinator() -> None:
    # A client installed alone must validate; only `plait run`'s local cluster (cli/local.py)
    # composes the daemons.
    found = []
    for path in sorted(CLIENT.rglob("*.py")):
        rel = str(path.relative_to(CLIENT))
        if rel in ("cli/local.py",) or rel.startswith("v1/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            found += [
                (rel, m) for m in mods if m.startswith(("plait.coordinator", "plait.workerd"))
            ]
    assert found == []
