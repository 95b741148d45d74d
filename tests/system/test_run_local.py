"""``plait.run_local``: a workflow run to the end in this process, for tests (docs/sdk.md).

A real coordinator (embedded, SQLite in a temp dir), a real in-process worker for the handlers
and, for exec actions, a real workerd process; nothing mocked. Also where the workflow's env
(sent once) is seen to reach exec actions through their leases, beneath their own.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import pytest

import plait

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        importlib.util.find_spec("plait.coordinator.server") is None,
        reason="needs plait.coordinator",
    ),
]


def test_handlers_run_in_process_and_the_result_names_states(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="plait")
    worker = plait.Worker()
    threads: set[str] = set()

    @worker.action("fetch")
    def fetch(ctx: plait.ActionContext) -> dict[str, int]:
        threads.add(threading.current_thread().name)
        ctx.log(f"fetching {ctx.input['url']}")
        return {"bytes": len(ctx.input["url"])}

    @worker.action("report")
    async def report(ctx: plait.ActionContext) -> dict[str, int]:
        return {"total": sum(n.outputs["bytes"] for n in ctx.needs.values())}

    wf = plait.Workflow("crawl")
    a = wf.handler("a", "fetch", input={"url": "abc"})
    b = wf.handler("b", "fetch", input={"url": "defgh"})
    wf.handler("report", "report", needs=[a, b])

    result = plait.run_local(wf, worker, timeout=60)

    assert result.state == "SUCCEEDED" and result.ok
    assert result.state == plait.WorkflowState.SUCCEEDED
    assert result.outputs("report") == {"total": 8}
    assert result.actions["a"].state == "SUCCEEDED" and result.actions["a"].attempt == 1
    assert threads  # the handlers ran here, in this process
    # What the worker did, at INFO: what it serves, and where it connected.
    said = caplog.text
    assert "worker run-local serving 2 handler(s) (fetch, report) with 4 slot(s)" in said
    assert "connected to 127.0.0.1:" in said


def test_a_failure_is_a_result_and_a_missing_handler_is_refused_up_front() -> None:
    def boom(ctx: plait.ActionContext) -> None:
        raise plait.ActionError("no such mirror", type="MirrorDown")

    wf = plait.Workflow("fails", defaults={"retry": {"max_attempts": 1}})
    wf.handler("x", "boom")
    result = plait.run_local(wf, {"boom": boom}, timeout=60)
    assert result.state == "FAILED" and not result.ok
    assert result.actions["x"].state == plait.ActionState.FAILED
    assert "no such mirror" in result.actions["x"].error

    with pytest.raises(ValueError, match="no handler given for 'missing'"):
        plait.run_local(
            plait.loads_workflow("actions: [{id: y, handler: missing}]"), {"boom": boom}
        )


@pytest.mark.usefixtures("workerd_available")
def test_exec_actions_get_the_workflow_env_beneath_their_own() -> None:
    write = 'printf \'{"mode": "%s", "dir": "%s"}\' "$MODE" "$WHERE" > "$PLAIT_OUTPUT"'
    wf = plait.Workflow("env", env={"MODE": "fast", "WHERE": "top"})
    wf.exec("plain", write, shell=True)
    wf.exec("own", write, shell=True, env={"MODE": "slow"})
    result = plait.run_local(wf, timeout=90)
    assert result.state == "SUCCEEDED", result.status
    assert result.outputs("plain") == {"mode": "fast", "dir": "top"}
    assert result.outputs("own") == {"mode": "slow", "dir": "top"}
