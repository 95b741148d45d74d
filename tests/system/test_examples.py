"""Every example under examples/ runs with `plait run` and ends the way it should."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        importlib.util.find_spec("plait.coordinator.server") is None
        or importlib.util.find_spec("plait.workerd.main") is None,
        reason="needs plait.coordinator and plait.workerd",
    ),
]


def plait_run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli.main",
            "run",
            *argv,
            "--store",
            f"sqlite:///{tmp_path}/plait.db",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )


def test_scatter_gather(tmp_path: Path) -> None:
    done = plait_run(tmp_path, "examples/scatter_gather.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # Plain progress lines (stdout is not a terminal), then the summary table.
    assert "[14/14] gather succeeded" in out
    assert "work-11" in out
    assert "state     succeeded" in out
    assert (tmp_path / "logs" / "workerd-local-0.log").exists()
    assert (tmp_path / "logs" / "workerd-local-1.log").exists()


def test_scatter_gather_json(tmp_path: Path) -> None:
    done = plait_run(tmp_path, "examples/scatter_gather.yaml", "--workers", "3", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "WORKFLOW_STATE_SUCCEEDED"
    workers = {a["worker_id"] for a in status["actions"]}
    assert workers <= {"local-0", "local-1", "local-2"}
    gather = next(a for a in status["actions"] if a["action_id"] == "gather")
    assert json.loads(gather["outputs_json"]) == {
        "branches": 12,
        "numbers": 1200,
        "total": 576720200,
    }


def test_handlers(tmp_path: Path) -> None:
    done = plait_run(
        tmp_path, "examples/handlers.yaml", "--handlers", "examples.handlers:worker", "-o", "json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    merge = next(a for a in status["actions"] if a["action_id"] == "merge")
    assert ["the", 4] in json.loads(merge["outputs_json"])["top"]


def test_failing_flow_exits_1(tmp_path: Path) -> None:
    flow = tmp_path / "fails.yaml"
    flow.write_text(
        "name: fails\nactions:\n"
        "  - {id: boom, run: 'exit 7'}\n"
        "  - {id: after, needs: boom, run: [true]}\n"
    )
    done = plait_run(tmp_path, str(flow))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "boom" in done.stdout and "failed" in done.stdout
    assert "skipped" in done.stdout
    assert "exit 7" in done.stdout


def test_bad_flow_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text("actions: [{id: a, run: [x], timeout: soon}]\n")
    done = plait_run(tmp_path, str(flow))
    assert done.returncode == 2
    assert f"{flow}: actions[0] (id 'a'): timeout:" in done.stderr
    assert not (tmp_path / "plait.db").exists()
