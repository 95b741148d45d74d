"""deploy/grafana: the committed dashboard JSON is exactly what dashboard.py builds.

Like tests/unit/test_proto_drift.py for the stubs: the dashboard is rebuilt in memory and
compared with ``deploy/grafana/plait.json`` byte for byte (``make dashboard`` regenerates it).
Every panel must carry at least one PromQL query, and every query must parse: they are wrapped
as recording rules and handed to ``promtool check rules`` (skipped where promtool is missing;
under CI, ``CI`` set, that is a failure: ``.ci/run`` installs it). Whether the queries return
data is tests/system/test_prometheus.py's job.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.tools import required_tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PY = ROOT / "deploy" / "grafana" / "dashboard.py"
COMMITTED = ROOT / "deploy" / "grafana" / "plait.json"


def load_dashboard_module() -> ModuleType:
    """deploy/grafana/dashboard.py, imported from its path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("plait_deploy_dashboard", DASHBOARD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> ModuleType:
    return load_dashboard_module()


def test_committed_json_matches_the_code(dashboard: ModuleType) -> None:
    fresh = dashboard.render()
    committed = COMMITTED.read_text()
    assert fresh == committed, (
        "deploy/grafana/plait.json drifted from deploy/grafana/dashboard.py —"
        " run `make dashboard` and commit the result"
    )


def test_every_panel_has_a_promql_query(dashboard: ModuleType) -> None:
    board = json.loads(COMMITTED.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 20, f"only {len(panels)} panels"
    empty = [p["title"] for p in panels if not any(t.get("expr") for t in p.get("targets", []))]
    assert not empty, f"panels without a PromQL query: {empty}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids are not unique: {ids}"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: duplicate refIds {refs}"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    for wanted in ("Throughput", "Latency", "Fork / join", "Workers", "Leases and fencing"):
        assert wanted in rows, f"row {wanted!r} missing: {rows}"
    # The helper the system test uses sees exactly these queries.
    listed = dashboard.queries(board)
    assert len(listed) == sum(len(p["targets"]) for p in panels)
    assert all(q.expr and q.panel and q.row for q in listed)


def test_every_query_parses(dashboard: ModuleType, tmp_path: Path) -> None:
    promtool = required_tool("promtool")
    board = json.loads(COMMITTED.read_text())
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": substitute(q.expr)}
        for i, q in enumerate(dashboard.queries(board))
    ]
    path = tmp_path / "dashboard_queries.yml"
    # JSON is YAML: no YAML writer needed.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"a dashboard query does not parse:\n{done.stdout}{done.stderr}"


def substitute(expr: str) -> str:
    """Grafana's template variables replaced by what Grafana would put there."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")


def test_a_broken_query_is_caught(dashboard: ModuleType) -> None:
    """The drift check can fail: a changed panel renders differently."""
    original = dashboard.ROWS
    try:
        first = original[0]
        dashboard.ROWS = (type(first)(first.title, first.panels[1:]), *original[1:])
        assert dashboard.render() != COMMITTED.read_text()
    finally:
        dashboard.ROWS = original
