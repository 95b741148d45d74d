"""plait.Worker handlers: context parsing and the handler executor (sync, async, cancel)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import plait
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import workflow_pb2
from plait.worker import ActionContext, HandlerExecutor, NeedResult, Worker
from plait.worker.executor import AttemptResult, Code
from plait.worker.handlers import parse_inputs


class FakeCtx:
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.kill_grace = 0.2
        self.results: list[AttemptResult] = []
        self.reported = asyncio.Event()
        self.thread: threading.Thread | None = None
        self.progress_reports: list[tuple[str, threading.Thread]] = []

    def report(self, result: AttemptResult) -> None:
        self.thread = threading.current_thread()
        self.results.append(result)
        self.reported.set()

    def progress(self, details_json: str) -> None:
        self.progress_reports.append((details_json, threading.current_thread()))


def handler_lease(
    name: str, inputs: dict[str, Any] | None = None, lease_id: str = "l1"
) -> pb.Lease:
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf",
        action_id="a",
        attempt=3,
        fencing_token=9,
        idempotency_key="wf/a",
        traceparent="00-abc-def-01",
        action=workflow_pb2.ActionSpec(id="a", handler=name, input_json='{"static": true}'),
        inputs_json=json.dumps(inputs) if inputs is not None else "",
    )


async def run(ex: HandlerExecutor, lease: pb.Lease, ctx: FakeCtx | None = None) -> AttemptResult:
    ctx = ctx or FakeCtx(lease.lease_id)
    ex.start(lease, ctx)
    await asyncio.wait_for(ctx.reported.wait(), 10)
    assert ctx.thread is threading.main_thread()  # reported on the loop thread
    return ctx.results[0]


def test_top_level_exports() -> None:
    assert plait.Worker is Worker
    assert plait.ActionContext is ActionContext


def test_parse_inputs() -> None:
    doc = {
        "input": {"k": [1, 2]},
        "needs": {
            "a": {"state": "ACTION_STATE_SUCCEEDED", "outputs": {"x": 1}},
            "b": {"state": "ACTION_STATE_FAILED"},
        },
    }
    static, needs = parse_inputs(json.dumps(doc))
    assert static == {"k": [1, 2]}
    assert needs["a"] == NeedResult("ACTION_STATE_SUCCEEDED", {"x": 1})
    assert needs["a"].succeeded and not needs["b"].succeeded
    assert needs["b"].outputs == {}
    assert parse_inputs("", '{"s": 1}') == ({"s": 1}, {})
    assert parse_inputs("", "") == (None, {})
    with pytest.raises(ValueError):
        parse_inputs("[1]")
    with pytest.raises(ValueError):
        parse_inputs('{"needs": {"a": 3}}')


def test_context_from_lease() -> None:
    lease = handler_lease(
        "h",
        {"input": {"n": 5}, "needs": {"up": {"state": "ACTION_STATE_SUCCEEDED", "outputs": {}}}},
    )
    ctx = ActionContext.from_lease(lease)
    assert (ctx.workflow_id, ctx.action_id, ctx.attempt, ctx.fencing_token) == ("wf", "a", 3, 9)
    assert ctx.idempotency_key == "wf/a" and ctx.traceparent == "00-abc-def-01"
    assert ctx.input == {"n": 5}
    assert list(ctx.needs) == ["up"] and ctx.needs["up"].state == "ACTION_STATE_SUCCEEDED"
    assert not ctx.cancelled
    ctx.cancelled.set()
    assert ctx.cancelled
    # Without inputs_json the static input of the spec is used.
    assert ActionContext.from_lease(handler_lease("h")).input == {"static": True}


def test_context_item() -> None:
    child = handler_lease("h", {"input": None, "item": {"name": "b", "n": 2}, "needs": {}})
    assert ActionContext.from_lease(child).item == {"name": "b", "n": 2}
    assert ActionContext.from_lease(handler_lease("h", {"input": 1, "item": "s"})).item == "s"
    # Not a map child: None.
    assert ActionContext.from_lease(handler_lease("h", {"input": 1, "needs": {}})).item is None
    assert ActionContext.from_lease(handler_lease("h")).item is None


def test_heartbeat_details_are_json_and_bounded() -> None:
    sent: list[str] = []
    ctx = ActionContext(progress=sent.append)
    ctx.heartbeat({"pct": 50})
    ctx.heartbeat()
    assert sent == ['{"pct":50}', "null"]
    # Exactly 64 KiB of JSON is fine; one byte more is refused, naming the limit.
    at_limit = "x" * (64 * 1024 - 2)  # plus the two quotes
    ctx.heartbeat(at_limit)
    assert len(sent[-1]) == 64 * 1024
    with pytest.raises(ValueError, match=r"65537 bytes of JSON, over the 64 KiB \(65536-byte\)"):
        ctx.heartbeat(at_limit + "x")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        ctx.heartbeat({"when": object()})
    assert len(sent) == 3
    # Without a session (a context built by hand) heartbeats go nowhere.
    ActionContext().heartbeat({"pct": 1})


def test_context_log_is_bounded() -> None:
    ctx = ActionContext()
    for i in range(10000):
        ctx.log(f"line {i} " + "x" * 50)
    tail = ctx.log_tail()
    assert len(tail) <= 64 * 1024
    assert tail.endswith("line 9999 " + "x" * 50)


def test_registration_rules() -> None:
    w = Worker()

    @w.action("one")
    def one(ctx: ActionContext) -> dict[str, Any]:
        return {}

    with pytest.raises(ValueError, match="already registered"):
        w.action("one")(one)
    with pytest.raises(ValueError):
        w.action("")
    other = Worker()
    other.action("one")(one)
    with pytest.raises(ValueError, match="registered twice"):
        HandlerExecutor([w, other], 2)


@pytest.fixture
async def executor() -> AsyncIterator[HandlerExecutor]:
    w = Worker()

    @w.action("async-ok")
    async def async_ok(ctx: ActionContext) -> dict[str, Any]:
        ctx.log("working")
        return {"input": ctx.input, "needs": sorted(ctx.needs), "token": ctx.fencing_token}

    @w.action("sync-ok")
    def sync_ok(ctx: ActionContext) -> dict[str, Any]:
        return {"thread": threading.current_thread().name}

    @w.action("none")
    def returns_none(ctx: ActionContext) -> None:
        return None

    @w.action("raises")
    async def raises(ctx: ActionContext) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    @w.action("sync-raises")
    def sync_raises(ctx: ActionContext) -> dict[str, Any]:
        raise KeyError("missing")

    @w.action("not-a-dict")
    def not_a_dict(ctx: ActionContext) -> Any:
        return [1, 2]

    @w.action("not-json")
    def not_json(ctx: ActionContext) -> Any:
        return {"when": object()}

    @w.action("slow-async")
    async def slow_async(ctx: ActionContext) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    @w.action("slow-sync")
    def slow_sync(ctx: ActionContext) -> dict[str, Any]:
        end = time.monotonic() + 30
        while time.monotonic() < end and not ctx.cancelled:
            time.sleep(0.01)
        return {"partial": True}

    @w.action("beats")
    async def beats(ctx: ActionContext) -> dict[str, Any]:
        ctx.heartbeat({"pct": 10})
        await asyncio.sleep(0)
        ctx.heartbeat({"pct": 20})
        return {"item": ctx.item}

    @w.action("sync-beats")
    def sync_beats(ctx: ActionContext) -> dict[str, Any]:
        ctx.heartbeat({"thread": threading.current_thread().name})
        try:
            ctx.heartbeat("x" * (70 * 1024))
        except ValueError as err:
            return {"error": str(err), "item": ctx.item}
        return {}

    ex = w.executor(slots=4)
    yield ex
    await ex.aclose()


async def test_heartbeats_reach_the_attempt_context_on_the_loop_thread(
    executor: HandlerExecutor,
) -> None:
    ctx = FakeCtx("l1")
    r = await run(executor, handler_lease("beats", {"input": 1, "item": [1, 2]}), ctx)
    assert json.loads(r.outputs_json) == {"item": [1, 2]}
    assert [d for d, _ in ctx.progress_reports] == ['{"pct":10}', '{"pct":20}']
    assert all(t is threading.main_thread() for _, t in ctx.progress_reports)

    ctx = FakeCtx("l2")
    lease = handler_lease("sync-beats", {"input": 1, "item": "it"}, lease_id="l2")
    r = await run(executor, lease, ctx)
    out = json.loads(r.outputs_json)
    assert "over the 64 KiB" in out["error"] and out["item"] == "it"
    # Sent from a pool thread, delivered on the loop thread, before the result.
    ((details, thread),) = ctx.progress_reports
    assert json.loads(details)["thread"].startswith("plait-handler")
    assert thread is threading.main_thread()


async def test_async_handler_outputs(executor: HandlerExecutor) -> None:
    lease = handler_lease("async-ok", {"input": {"q": 1}, "needs": {"x": {"state": "S"}}})
    r = await run(executor, lease)
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED
    assert json.loads(r.outputs_json) == {"input": {"q": 1}, "needs": ["x"], "token": 9}
    assert r.stdout_tail == "working"


async def test_sync_handler_runs_in_the_pool(executor: HandlerExecutor) -> None:
    r = await run(executor, handler_lease("sync-ok"))
    assert json.loads(r.outputs_json)["thread"].startswith("plait-handler")
    r = await run(executor, handler_lease("none"))
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED and r.outputs_json == "{}"


@pytest.mark.parametrize(
    ("name", "message", "code"),
    [
        ("raises", "RuntimeError: disk on fire", Code.UNKNOWN),
        ("sync-raises", "KeyError: 'missing'", Code.UNKNOWN),
        ("not-a-dict", "handler returned list, not a dict", Code.INVALID_ARGUMENT),
        ("not-json", "not JSON-serialisable", Code.INVALID_ARGUMENT),
    ],
)
async def test_failures(executor: HandlerExecutor, name: str, message: str, code: int) -> None:
    r = await run(executor, handler_lease(name))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert message in r.error
    assert r.error_code == code


async def test_exception_traceback_in_stderr_tail(executor: HandlerExecutor) -> None:
    r = await run(executor, handler_lease("raises"))
    assert "Traceback" in r.stderr_tail and "disk on fire" in r.stderr_tail


async def test_cancel_async_handler(executor: HandlerExecutor) -> None:
    ctx = FakeCtx("l1")
    executor.start(handler_lease("slow-async"), ctx)
    await asyncio.sleep(0.05)
    executor.cancel("l1", "user cancelled")
    await asyncio.wait_for(ctx.reported.wait(), 5)
    assert ctx.results[0].outcome == pb.ACTION_OUTCOME_CANCELLED
    assert ctx.results[0].error == "user cancelled"


async def test_cancel_sync_handler_is_cooperative(executor: HandlerExecutor) -> None:
    ctx = FakeCtx("l1")
    executor.start(handler_lease("slow-sync"), ctx)
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    executor.cancel("l1", "superseded")
    await asyncio.wait_for(ctx.reported.wait(), 5)
    assert time.monotonic() - t0 < 2
    assert ctx.results[0].outcome == pb.ACTION_OUTCOME_CANCELLED


async def test_many_async_handlers_quickly() -> None:
    w = Worker()

    @w.action("noop")
    async def noop(ctx: ActionContext) -> dict[str, Any]:
        return {}

    ex = w.executor(slots=8)
    n = 5000
    done = 0
    finished = asyncio.Event()

    class Ctx:
        lease_id = ""
        kill_grace = 1.0

        def report(self, result: AttemptResult) -> None:
            nonlocal done
            done += 1
            if done == n:
                finished.set()

    ctx = Ctx()
    lease = handler_lease("noop")
    t0 = time.perf_counter()
    for i in range(n):
        lease.lease_id = f"l{i}"
        ex.start(lease, ctx)
    await asyncio.wait_for(finished.wait(), 30)
    rate = n / (time.perf_counter() - t0)
    print(f"async no-op handlers: {rate:.0f}/s")
    await ex.aclose()
    assert rate > 2000
