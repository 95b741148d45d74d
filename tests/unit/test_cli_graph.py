"""``plait graph``: DOT and Mermaid of a spec, and of a workflow's status (plait.cli.graph).

Pure: specs from YAML text, statuses built by hand. The real coordinator's side (the spec from
the history, the states, a map's children) is in tests/system/test_cli_graph.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plait.cli.graph import build_graph, is_file_target, to_dot, to_mermaid
from plait.cli.main import main
from plait.spec import loads_workflow
from plait.v1 import workflow_pb2 as pb

FLOW = """
name: fan "quoted"
actions:
  - {id: list, run: 'echo'}
  - {id: each, needs: [list], map: list.items, handler: resize}
  - {id: a, needs: [list], run: 'true'}
  - {id: b, needs: [list], run: 'true'}
  - {id: done, needs: [each, a, b], join: {at_least: 2}, run: 'true'}
  - {id: race, needs: [a, b], join: any, run: 'true'}
"""


def spec() -> pb.WorkflowSpec:
    return loads_workflow(FLOW, source="fan.yaml")


def status(children: int = 3) -> pb.WorkflowStatus:
    s = pb.WorkflowStatus(workflow_id="wf-1", name="fan", state=pb.WORKFLOW_STATE_RUNNING)
    for action_id, state in (
        ("list", pb.ACTION_STATE_SUCCEEDED),
        ("each", pb.ACTION_STATE_RUNNING),
        ("a", pb.ACTION_STATE_SUCCEEDED),
        ("b", pb.ACTION_STATE_FAILED),
        ("done", pb.ACTION_STATE_PENDING),
        ("race", pb.ACTION_STATE_READY),
    ):
        s.actions.add(action_id=action_id, state=state)
    for i in range(children):
        state = pb.ACTION_STATE_SUCCEEDED if i % 2 else pb.ACTION_STATE_RUNNING
        s.actions.add(action_id=f"each.{i}", state=state, parent_id="each", attempt=1 + i % 3)
    return s


def edges_of_dot(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)";$', text, re.MULTILINE))


def test_dot_of_a_file_has_every_action_and_need() -> None:
    text = to_dot(build_graph(spec()))
    assert text.startswith('digraph "fan \\"quoted\\"" {')
    assert text.rstrip().endswith("}")
    assert edges_of_dot(text) == {
        ("list", "each"),
        ("list", "a"),
        ("list", "b"),
        ("each", "done"),
        ("a", "done"),
        ("b", "done"),
        ("a", "race"),
        ("b", "race"),
    }
    assert '"done" [label="done\\nexec\\njoin: at least 2 of 3"' in text
    assert '"race" [label="race\\nexec\\njoin: any of 2"' in text
    # The map is drawn in its own box, with what it will become.
    assert 'subgraph "cluster_each" {' in text
    assert 'label="each: one child per item, at runtime";' in text
    assert '"each" [label="each\\nmap over list.items"];' in text
    assert "fillcolor=" not in text.split("node [", 1)[1].split("\n", 1)[1]  # no states


def test_dot_of_a_status_colours_states_and_groups_children() -> None:
    text = to_dot(build_graph(spec(), status(), max_children=2))
    assert 'label="fan \\"quoted\\" (running)";' in text
    assert '"a" [label="a\\nexec\\nsucceeded", fillcolor="#a5d6a7"];' in text
    assert '"b" [label="b\\nexec\\nfailed", fillcolor="#ef9a9a"];' in text
    # M-of-N: done needs 2 of each/a/b; only a has succeeded.
    assert "join at least 2: 1 of 3 succeeded, needs 2\\npending" in text
    cluster = text.split('subgraph "cluster_each" {', 1)[1].split("  }", 1)[0]
    assert 'label="each: 3 children (2 running, 1 succeeded)";' in cluster
    assert '"each.0" [label="each.0\\nrunning"' in cluster
    assert '"each.1" [label="each.1\\nsucceeded, attempt 2"' in cluster
    assert '"each.2"' not in cluster  # past --max-children...
    assert '"each.…" [label="… 1 more\\n1 running", style="rounded,dotted"];' in cluster


def test_mermaid_uses_safe_ids_and_classes_per_state() -> None:
    text = to_mermaid(build_graph(spec(), status()))
    lines = text.splitlines()
    assert lines[:4] == ["---", 'title: "fan \\"quoted\\" (running)"', "---", "flowchart LR"]
    ids = dict(re.findall(r'^\s*(n\d+)\["([^"<]+)', text, re.MULTILINE))
    assert sorted(ids.values()) == sorted(
        ["list", "each", "a", "b", "done", "race", "each.0", "each.1", "each.2"]
    )
    by_name = {v: k for k, v in ids.items()}
    edges = set(re.findall(r"^\s*(n\d+) --> (n\d+)$", text, re.MULTILINE))
    assert (by_name["list"], by_name["each"]) in edges and len(edges) == 8
    assert "  classDef succeeded fill:#a5d6a7" in lines
    succeeded = next(x for x in lines if x.startswith("  class ") and x.endswith(" succeeded"))
    assert set(succeeded.split()[1].split(",")) == {
        by_name["list"],
        by_name["a"],
        by_name["each.1"],
    }
    assert '  subgraph g1["each: 3 children (2 running, 1 succeeded)"]' in lines
    assert text.count("\n  end") == 1


def test_labels_cannot_break_out_of_their_quotes() -> None:
    # The converter takes any handler name (the coordinator refuses it later): a good test.
    s = loads_workflow(
        "name: 'n\"}; x'\nactions:\n  - {id: l, handler: 'h\"]; <b>evil\\'}\n",
    )
    dot = to_dot(build_graph(s))
    assert dot.startswith('digraph "n\\"}; x" {')
    assert '"l" [label="l\\nhandler h\\"]; <b>evil\\\\"];' in dot
    mermaid = to_mermaid(build_graph(s))
    assert 'title: "n\\"}; x"' in mermaid
    assert 'n0["l<br>handler h#quot;]; #lt;b#gt;evil\\"]' in mermaid


def test_pipeline_children_are_chained_by_stage() -> None:
    s = loads_workflow(
        "actions:\n  - {id: src, run: 'true'}\n"
        "  - id: p\n    needs: [src]\n    pipeline:\n      over: src.items\n"
        "      stages: [{id: fetch, run: 'true'}, {id: parse, run: 'true'}]\n"
    )
    st = pb.WorkflowStatus(name="p")
    st.actions.add(action_id="src", state=pb.ACTION_STATE_SUCCEEDED)
    st.actions.add(action_id="p", state=pb.ACTION_STATE_RUNNING)
    for item in range(2):
        for stage in ("fetch", "parse"):
            done = pb.ACTION_STATE_SUCCEEDED
            st.actions.add(action_id=f"p.{item}.{stage}", state=done, parent_id="p")
    g = build_graph(s, st)
    assert ("p.0.fetch", "p.0.parse") in g.edges and ("p.1.fetch", "p.1.parse") in g.edges
    assert ("p.0.fetch", "p.1.parse") not in g.edges
    assert "pipeline over src.items: fetch → parse" in to_dot(g)


def test_file_or_id(tmp_path: Path) -> None:
    assert is_file_target("flow.yaml") and is_file_target("dir/flow")
    existing = tmp_path / "plain"
    existing.write_text("x")
    assert is_file_target(str(existing))
    assert not is_file_target("wf-0123abcd")


def test_the_command_prints_a_file_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = tmp_path / "fan.yaml"
    flow.write_text(FLOW)
    assert main(["graph", str(flow), "--format", "mermaid"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == "flowchart LR"
    assert main(["graph", str(flow)]) == 0
    assert capsys.readouterr().out.startswith("digraph ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("actions: [{id: a, needs: [ghost], run: 'true'}]\n")
    assert main(["graph", str(bad)]) == 2
    assert "unknown action id 'ghost'" in capsys.readouterr().err
