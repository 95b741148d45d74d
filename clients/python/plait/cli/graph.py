"""``plait graph FLOW.yaml|ID``: a workflow's DAG as Graphviz DOT or Mermaid (CLI layer).

From a file, the DAG the spec describes: one node per action (its kind, and its join when it
has one), one edge per need. From a workflow id, the same DAG fetched from the coordinator (the
spec its history starts with) with each action's state as a fill colour (DOT) or a class
(Mermaid), joins showing how many of their needs have succeeded (``2 of 3 succeeded, needs
2``), and each map's or pipeline's children grouped in a box under the action that made them
(at most ``--max-children`` drawn per group; the rest summed up in one node by state).

Render with ``plait graph ID | dot -Tsvg > dag.svg``, or paste the Mermaid text into Markdown
(GitHub, GitLab and most wikis draw a ```mermaid block).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plait.cli.commands import add_context_flag, add_tls_flags, client_for, whole_number
from plait.cli.flows import add_param_flags, load_flow
from plait.cli.render import clean
from plait.errors import NotFoundError
from plait.v1 import workflow_pb2

if TYPE_CHECKING:
    from plait.client import Client

    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "STATE_COLOURS",
    "Graph",
    "GraphNode",
    "add_parser",
    "build_graph",
    "cmd_graph",
    "to_dot",
    "to_mermaid",
]

EXIT_OK = 0
DEFAULT_MAX_CHILDREN = 20
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_MAX_LABEL = 48  # characters of a user string (a map's path) drawn in a node

# Fill colour of each state (short names); Mermaid classes use the same (and the name).
STATE_COLOURS = {
    "pending": "#eeeeee",
    "ready": "#fff59d",
    "leased": "#bbdefb",
    "running": "#64b5f6",
    "succeeded": "#a5d6a7",
    "failed": "#ef9a9a",
    "timed_out": "#ffab91",
    "cancelled": "#bdbdbd",
    "skipped": "#ffffff",
}
_STRIPPED = {"skipped", "cancelled"}  # drawn dashed: they never ran


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One node: an action, or the summary of a group's children left out."""

    id: str
    lines: tuple[str, ...]
    state: str = ""  # short state name ("succeeded"), "" when not known
    group: str = ""  # the map/pipeline action whose child it is, "" for a spec action


@dataclass(slots=True)
class Graph:
    """A workflow's DAG, ready to be written as DOT or Mermaid."""

    name: str
    state: str = ""
    nodes: list[GraphNode] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)  # (need, action)
    groups: dict[str, str] = field(default_factory=dict)  # fan-out action id -> box label


def add_parser(sub: _SubParsers) -> None:
    """Registers ``plait graph``."""
    p = sub.add_parser(
        "graph",
        help="print a workflow's DAG as Graphviz DOT or Mermaid",
        description="Print the DAG of FLOW.yaml, or of the running or finished workflow ID"
        " (fetched from the coordinator, each action coloured by its state, map and pipeline"
        " children grouped under the action that made them, joins showing how many needs"
        " succeeded). Render DOT with `dot -Tsvg`; paste Mermaid into Markdown.",
    )
    p.add_argument(
        "target",
        metavar="FLOW.yaml|ID",
        help="a workflow file (a path that exists, or ends .yaml/.yml/.json), else a workflow id",
    )
    p.add_argument(
        "--format",
        choices=("dot", "mermaid"),
        default="dot",
        help="Graphviz DOT (default) or a Mermaid flowchart",
    )
    p.add_argument(
        "--max-children",
        type=whole_number(0),
        default=DEFAULT_MAX_CHILDREN,
        metavar="N",
        help="children of one map or pipeline drawn for an ID; the rest are summed up in one"
        f" node (default {DEFAULT_MAX_CHILDREN})",
    )
    add_param_flags(p)
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="coordinator address, for an ID (default: $PLAIT_COORDINATOR, else the context's,"
        " else 127.0.0.1:7450)",
    )
    add_tls_flags(p)
    add_context_flag(p)
    p.set_defaults(func=cmd_graph)


def is_file_target(target: str) -> bool:
    """Whether ``plait graph TARGET`` names a file rather than a workflow id."""
    return os.path.exists(target) or target.endswith(_FILE_SUFFIXES) or os.sep in target


def _short(text: str) -> str:
    text = clean(text)
    return text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…"


def _kind_line(a: workflow_pb2.ActionSpec) -> str:
    if a.HasField("map"):
        return f"map over {_short(a.map.over)}"
    if a.HasField("pipeline"):
        stages = " → ".join(s.id for s in a.pipeline.stages)
        return f"pipeline over {_short(a.pipeline.over)}: {_short(stages)}"
    if a.WhichOneof("kind") == "handler":
        return f"handler {_short(a.handler)}"
    return "exec"


def _required(join: workflow_pb2.JoinPolicy, n: int) -> int:
    """How many of ``n`` needs the join requires."""
    if join.kind == workflow_pb2.JOIN_KIND_ANY:
        return min(1, n)
    if join.kind == workflow_pb2.JOIN_KIND_AT_LEAST:
        if join.at_least_count:
            return int(join.at_least_count)
        return math.ceil(join.at_least_fraction * n)
    return n


def _join_line(a: workflow_pb2.ActionSpec, states: dict[str, str] | None) -> str | None:
    n = len(a.needs)
    if not a.HasField("join") and n < 2:
        return None
    if a.HasField("map") or a.HasField("pipeline"):
        # A fan-out's join counts its children too, which the spec cannot count.
        j = a.join
        if j.kind == workflow_pb2.JOIN_KIND_ANY:
            return "join: any child"
        if j.kind == workflow_pb2.JOIN_KIND_AT_LEAST and j.at_least_fraction:
            return f"join: at least {j.at_least_fraction:.0%} of the children"
        if j.kind == workflow_pb2.JOIN_KIND_AT_LEAST:
            return f"join: at least {j.at_least_count} children"
        return None
    need = _required(a.join, n)
    policy = {
        workflow_pb2.JOIN_KIND_ANY: "any",
        workflow_pb2.JOIN_KIND_AT_LEAST: f"at least {need}",
    }.get(a.join.kind, "all")
    if states is None:
        return f"join: {policy} of {n}"
    done = sum(1 for need_id in a.needs if states.get(need_id) == "succeeded")
    return f"join {policy}: {done} of {n} succeeded, needs {need}"


def _short_state(state: int) -> str:
    name = workflow_pb2.ActionState.Name(workflow_pb2.ActionState.ValueType(state))
    return name.removeprefix("ACTION_STATE_").lower()


def build_graph(
    spec: workflow_pb2.WorkflowSpec,
    status: workflow_pb2.WorkflowStatus | None = None,
    *,
    max_children: int = DEFAULT_MAX_CHILDREN,
) -> Graph:
    """The graph of ``spec``; with ``status``, coloured by state and with fan-out children."""
    states: dict[str, str] | None = None
    children: dict[str, list[workflow_pb2.ActionStatus]] = {}
    graph = Graph(name=spec.name)
    if status is not None:
        graph.state = (
            workflow_pb2.WorkflowState.Name(workflow_pb2.WorkflowState.ValueType(status.state))
            .removeprefix("WORKFLOW_STATE_")
            .lower()
        )
        states = {}
        for s in status.actions:
            states[s.action_id] = _short_state(s.state)
            if s.parent_id:
                children.setdefault(s.parent_id, []).append(s)
    for a in spec.actions:
        lines = [a.id, _kind_line(a)]
        join = _join_line(a, states)
        if join:
            lines.append(join)
        state = states.get(a.id, "") if states is not None else ""
        if state:
            lines.append(state)
        graph.nodes.append(GraphNode(a.id, tuple(lines), state))
        graph.edges.extend((need, a.id) for need in a.needs)
        if a.HasField("map") or a.HasField("pipeline"):
            kids = children.get(a.id, [])
            graph.groups[a.id] = _group_label(a, kids, status is not None)
            _add_children(graph, a, kids, max_children)
    return graph


def _group_label(
    a: workflow_pb2.ActionSpec, kids: Sequence[workflow_pb2.ActionStatus], known: bool
) -> str:
    if not known:
        return f"{a.id}: one child per item, at runtime"
    counts = Counter(_short_state(k.state) for k in kids)
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{a.id}: {len(kids)} children" + (f" ({shown})" if shown else "")


def _add_children(
    graph: Graph,
    parent: workflow_pb2.ActionSpec,
    kids: Sequence[workflow_pb2.ActionStatus],
    max_children: int,
) -> None:
    drawn = kids[:max_children]
    ids = {k.action_id for k in drawn}
    for k in drawn:
        state = _short_state(k.state)
        shown = state if k.attempt <= 1 else f"{state}, attempt {k.attempt}"
        graph.nodes.append(GraphNode(k.action_id, (k.action_id, shown), state, group=parent.id))
    if parent.HasField("pipeline"):
        # `<id>.<item>.<stage>`: each item's stages run in order.
        stages = [s.id for s in parent.pipeline.stages]
        for k in drawn:
            item, _, stage = k.action_id.removeprefix(parent.id + ".").partition(".")
            if stage in stages and stages.index(stage) > 0:
                before = f"{parent.id}.{item}.{stages[stages.index(stage) - 1]}"
                if before in ids:
                    graph.edges.append((before, k.action_id))
    rest = kids[max_children:]
    if rest:
        counts = Counter(_short_state(k.state) for k in rest)
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        graph.nodes.append(
            GraphNode(f"{parent.id}.…", (f"… {len(rest)} more", shown), "", group=parent.id)
        )


# DOT -------------------------------------------------------------------------------------------


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(node: GraphNode) -> str:
    attrs = [f"label={_dot_str(chr(10).join(node.lines))}"]
    if node.state:
        attrs.append(f'fillcolor="{STATE_COLOURS.get(node.state, "#ffffff")}"')
        if node.state in _STRIPPED:
            attrs.append('style="rounded,filled,dashed"')
    elif node.id.endswith(".…"):
        attrs.append('style="rounded,dotted"')
    return f"{_dot_str(node.id)} [{', '.join(attrs)}];"


def to_dot(graph: Graph) -> str:
    """The graph as a Graphviz ``digraph`` (``dot -Tsvg``)."""
    title = clean(graph.name) + (f" ({graph.state})" if graph.state else "")
    out = [
        f"digraph {_dot_str(clean(graph.name))} {{",
        f"  label={_dot_str(title)};",
        "  labelloc=t;",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica"];',
    ]
    grouped: dict[str, list[GraphNode]] = {}
    for node in graph.nodes:
        grouped.setdefault(node.group, []).append(node)
    for node in grouped.get("", []):
        if node.id in graph.groups:
            out.append(f"  subgraph {_dot_str('cluster_' + node.id)} {{")
            out.append(f"    label={_dot_str(graph.groups[node.id])};")
            out.append('    style="rounded,dashed";')
            out.append(f"    {_dot_node(node)}")
            out.extend(f"    {_dot_node(child)}" for child in grouped.get(node.id, []))
            out.append("  }")
        else:
            out.append(f"  {_dot_node(node)}")
    out.extend(f"  {_dot_str(a)} -> {_dot_str(b)};" for a, b in graph.edges)
    out.append("}")
    return "\n".join(out)


# Mermaid ---------------------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    # Inside ["..."]: quotes and the characters Mermaid reads as markup become entities.
    for char, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, entity)
    return text


def _mermaid_label(lines: Iterable[str]) -> str:
    return '["' + "<br>".join(_mermaid_text(line) for line in lines) + '"]'


def to_mermaid(graph: Graph) -> str:
    """The graph as a Mermaid ``flowchart`` (node ids are ``n0``, ``n1``...; labels hold the
    action ids, which Mermaid would otherwise read as syntax)."""
    key = {node.id: f"n{i}" for i, node in enumerate(graph.nodes)}
    title = clean(graph.name) + (f" ({graph.state})" if graph.state else "")
    out = ["---", f"title: {json.dumps(title)}", "---", "flowchart LR"]
    grouped: dict[str, list[GraphNode]] = {}
    for node in graph.nodes:
        grouped.setdefault(node.group, []).append(node)
    for i, node in enumerate(grouped.get("", [])):
        line = f"{key[node.id]}{_mermaid_label(node.lines)}"
        if node.id in graph.groups:
            out.append(f'  subgraph g{i}["{_mermaid_text(graph.groups[node.id])}"]')
            out.append(f"    {line}")
            out.extend(
                f"    {key[child.id]}{_mermaid_label(child.lines)}"
                for child in grouped.get(node.id, [])
            )
            out.append("  end")
        else:
            out.append(f"  {line}")
    out.extend(f"  {key[a]} --> {key[b]}" for a, b in graph.edges if a in key and b in key)
    by_state: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.state:
            by_state.setdefault(node.state, []).append(key[node.id])
    for state, ids in by_state.items():
        dashed = ",stroke-dasharray:4 3" if state in _STRIPPED else ""
        out.append(f"  classDef {state} fill:{STATE_COLOURS.get(state, '#ffffff')}{dashed}")
        out.append(f"  class {','.join(ids)} {state}")
    return "\n".join(out)


# The command -----------------------------------------------------------------------------------


def fetch(
    client: Client, workflow_id: str
) -> tuple[workflow_pb2.WorkflowSpec, workflow_pb2.WorkflowStatus]:
    """A workflow's spec (the first event of its history) and its status now."""
    spec = None
    events = client.watch(workflow_id, follow=False)
    with contextlib.closing(events):  # type: ignore[type-var]
        for event in events:
            if event.type == workflow_pb2.EVENT_TYPE_WORKFLOW_SUBMITTED:
                spec = event.spec
                break
    if spec is None:
        raise NotFoundError(f"workflow {workflow_id}: its history holds no submitted spec")
    return spec, client.get(workflow_id)


def cmd_graph(args: argparse.Namespace) -> int:
    """``plait graph``."""
    status = None
    if is_file_target(args.target):
        args.flow = args.target
        spec = load_flow(args)
    else:
        with client_for(args) as client:
            spec, status = fetch(client, args.target)
    graph = build_graph(spec, status, max_children=args.max_children)
    print(to_dot(graph) if args.format == "dot" else to_mermaid(graph))
    return EXIT_OK
