"""``plait graph ID``, parameters at submit and client contexts, against a real coordinator.

One coordinator and one workerd (real subprocesses) serve the module. The CLI runs in this
process and reaches the coordinator only through a context of a client config file (no
``--coordinator``): a submit with ``-p`` values (the journal holds the resolved spec), then the
graph of the finished workflow (states, a map's children in their box, a join's M of N), of a
running one (an action no worker can run stays ``ready``), and of an unknown id (exit 2); and
``plait run`` of examples/params.yaml with ``-p`` values.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.cli.main import main
from plait.v1 import workflow_pb2 as pb
from tests.system.harness import Cluster, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

FLOW = """
name: graphed-${params.tag}
params:
  tag: {description: names the run}
  items: {default: [1, 2]}
actions:
  - id: list
    run: [sh, -c, 'printf "%s" "$1" > "$PLAIT_OUTPUT"', sh, '{"items": ${params.items}}']
  - {id: each, needs: [list], map: list.items, run: ['true']}
  - {id: ok1, run: ['true']}
  - {id: ok2, run: ['true']}
  - {id: bad, run: ['false'], retry: {max_attempts: 1}}
  - {id: gather, needs: [each, ok1, ok2, bad], join: {at_least: 3}, run: ['true']}
"""

STUCK = """
name: stuck
actions:
  - {id: first, run: ['true']}
  - {id: second, needs: [first], handler: nobody-serves-this}
"""


@pytest.fixture(scope="module")
def coordinator_available() -> None:
    import importlib.util

    for module in ("plait.coordinator.__main__", "plait.workerd.__main__"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} does not exist yet")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, coordinator_available: None
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cli-graph"))
    try:
        c.start_coordinator()
        c.add_worker("g1", slots=4)
        yield c
    finally:
        c.close()


@pytest.fixture
def context(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A client config file whose context `sys` is the cluster; nothing else names it."""
    for var in list(os.environ):
        if var.startswith("PLAIT_"):
            monkeypatch.delenv(var)
    config = tmp_path / "config.toml"
    config.write_text(f'[contexts.sys]\ncoordinator = "{cluster.grpc_target}"\n')
    monkeypatch.setenv("PLAIT_CLIENT_CONFIG", str(config))
    monkeypatch.setenv("PLAIT_CONTEXT", "sys")  # what commands without --context use
    return "sys"


@pytest.fixture(scope="module")
def finished(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """FLOW submitted through the CLI with parameters, and run to its end."""
    flow = tmp_path_factory.mktemp("flows") / "graphed.yaml"
    flow.write_text(FLOW)
    config = flow.parent / "config.toml"
    config.write_text(
        f'current-context = "sys"\n[contexts.sys]\ncoordinator = "{cluster.grpc_target}"\n'
    )
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var.startswith("PLAIT_"):
                mp.delenv(var)
        mp.setenv("PLAIT_CLIENT_CONFIG", str(config))
        argv = ["submit", str(flow), "-p", "tag=t1", "-p", "items=[1, 2, 3]", "-o", "json"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
    workflow_id = str(json.loads(out.getvalue())["workflow_id"])
    status = cluster.wait_workflow(workflow_id)
    assert status.state == pb.WORKFLOW_STATE_PARTIALLY_SUCCEEDED, status
    return workflow_id


def test_the_journal_holds_the_spec_with_values_applied(cluster: Cluster, finished: str) -> None:
    submitted = cluster.history(finished)[0]
    assert submitted.type == pb.EVENT_TYPE_WORKFLOW_SUBMITTED
    spec = submitted.spec
    assert spec.name == "graphed-t1"
    assert spec.actions[0].exec.argv[-1] == '{"items": [1,2,3]}'
    assert "${" not in str(spec) and "params" not in str(spec)
    children = [a.action_id for a in cluster.get(finished).actions if a.parent_id == "each"]
    assert children == ["each.0", "each.1", "each.2"]  # the -p list, not the default


def test_graph_of_a_finished_workflow(
    finished: str, context: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--context", context, "graph", finished]) == 0
    dot = capsys.readouterr().out
    assert 'label="graphed-t1 (partially_succeeded)";' in dot
    assert '"bad" [label="bad\\nexec\\nfailed", fillcolor="#ef9a9a"];' in dot
    assert "join at least 3: 3 of 4 succeeded, needs 3\\nsucceeded" in dot
    box = dot.split('subgraph "cluster_each" {', 1)[1].split("\n  }", 1)[0]
    assert 'label="each: 3 children (3 succeeded)";' in box
    assert re.findall(r'"(each\.\d)" \[', box) == ["each.0", "each.1", "each.2"]
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)";', dot))
    needs = {("list", "each")} | {(n, "gather") for n in ("each", "ok1", "ok2", "bad")}
    assert edges == needs
    assert main(["graph", finished, "--format", "mermaid", "--context", context]) == 0
    mermaid = capsys.readouterr().out
    assert "classDef failed fill:#ef9a9a" in mermaid
    assert mermaid.count(" --> ") == 5


def test_graph_of_a_running_workflow_shows_what_waits(
    cluster: Cluster, context: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = tmp_path / "stuck.yaml"
    flow.write_text(STUCK)
    assert main(["submit", str(flow)]) == 0
    workflow_id = capsys.readouterr().out.strip().splitlines()[0]

    def first_done() -> bool:
        states = {a.action_id: a.state for a in cluster.get(workflow_id).actions}
        return states["first"] == pb.ACTION_STATE_SUCCEEDED

    try:
        wait_for("first to succeed", first_done, 30)
        assert main(["graph", workflow_id]) == 0  # the context from $PLAIT_CONTEXT
        dot = capsys.readouterr().out
    finally:
        cluster.cancel(workflow_id)
    assert "(running)" in dot
    assert '"first" [label="first\\nexec\\nsucceeded", fillcolor="#a5d6a7"];' in dot
    assert '"second" [label="second\\nhandler nobody-serves-this\\nready"' in dot


def test_an_unknown_id_exits_2(context: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--context", context, "graph", "wf-does-not-exist"]) == 2
    assert "plait: error:" in capsys.readouterr().err


def test_plait_run_takes_parameters(tmp_path: Path) -> None:
    """examples/params.yaml under `plait run` (its own coordinator and a worker): -p values
    decide the name and how many children the map makes."""
    root = Path(__file__).resolve().parents[2]
    argv = ["run", "examples/params.yaml", "-p", "greeting=hi", "-p", "count=3", "-o", "json"]
    store = ["--workers", "1", "--store", f"sqlite:///{tmp_path}/plait.db"]
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli.main", *argv, *store],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["name"] == "params-hi"
    assert status["state"] == "WORKFLOW_STATE_SUCCEEDED"
    children = [a["action_id"] for a in status["actions"] if a.get("parent_id") == "each"]
    assert children == ["each.0", "each.1", "each.2"]
