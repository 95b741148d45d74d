"""examples/polyglot.yaml end to end: Python handlers, a TypeScript handler and an exec action
in one workflow, each run by the worker that serves it (docs/workers.md).

A real coordinator, one ``plait workerd`` (exec on, ``--handlers examples.handlers:worker``)
and one TypeScript worker (``clients/typescript/dist/examples/worker.js``). The TypeScript
worker is the only one serving ``shout``, workerd the only one serving the Python handlers and
exec, so the history shows who ran what.
"""

from __future__ import annotations

import json

import pytest

from plait.spec import load_workflow
from plait.v1 import workflow_pb2 as wf
from tests.conformance.workers import KNOWN, start_worker
from tests.system import invariants
from tests.system.harness import ROOT, Cluster, describe

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("workerd_available")]

TYPESCRIPT = next(impl for impl in KNOWN if impl.name == "typescript")


def test_python_typescript_and_exec_actions_share_one_workflow(cluster: Cluster) -> None:
    TYPESCRIPT.require()  # skips without a built TypeScript worker; fails under CI
    cluster.start_coordinator()
    cluster.add_worker("py", slots=2, handlers=["examples.handlers:worker"])
    start_worker(cluster, TYPESCRIPT, "ts", slots=2)

    spec = load_workflow(ROOT / "examples" / "polyglot.yaml")
    workflow_id = cluster.submit(spec)
    status = cluster.wait_workflow(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    events = cluster.history(workflow_id)
    invariants.check_history(events, spec)
    ran_on = {
        e.action_id: e.worker_id
        for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)
        if e.action_state == wf.ACTION_STATE_SUCCEEDED
    }
    assert ran_on == {
        "load": "py",
        "count-0": "py",
        "count-1": "py",
        "merge": "py",
        "shout": "ts",
        "report": "py",
    }
    outputs = {a.action_id: json.loads(a.outputs_json or "{}") for a in status.actions}
    assert outputs["shout"]["by"] == "typescript"
    assert outputs["shout"]["shouted"][0] == "THE x4"  # merge's top word, shouted in TypeScript
    assert outputs["report"]["report"].startswith(f"{outputs['merge']['words']} words, loudest:")
