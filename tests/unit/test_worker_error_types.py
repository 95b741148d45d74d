"""The SDK types a handler's failure: ``ActionResult.error_type`` is the exception's class name
or a ``plait.ActionError``'s type; the SDK's own failures and other outcomes carry none, and a
type the coordinator would refuse is never sent."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

import plait
from plait.clock import ManualClock
from plait.errors import MAX_ERROR_TYPE_BYTES, ActionError
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import workflow_pb2
from plait.worker import ActionContext, HandlerExecutor, Worker
from plait.worker.attempts import AttemptBook
from plait.worker.executor import AttemptResult, Code
from plait.worker.session_config import SessionStats


class RateLimited(ActionError):
    """A handler's own typed error: its class name is its type."""


class FlakyMirror(Exception):
    """A plain exception class of the handler's."""


class FakeCtx:
    def __init__(self, lease_id: str) -> None:
        self.lease_id = lease_id
        self.kill_grace = 0.2
        self.results: list[AttemptResult] = []
        self.reported = asyncio.Event()

    def report(self, result: AttemptResult) -> None:
        self.results.append(result)
        self.reported.set()

    def progress(self, details_json: str) -> None:
        pass


def lease(name: str, lease_id: str = "l1") -> pb.Lease:
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf",
        action_id="a",
        attempt=1,
        fencing_token=1,
        action=workflow_pb2.ActionSpec(id="a", handler=name),
        inputs_json=json.dumps({"input": None, "needs": {}}),
    )


async def run(ex: HandlerExecutor, name: str) -> AttemptResult:
    ctx = FakeCtx(name)
    ex.start(lease(name, name), ctx)
    await asyncio.wait_for(ctx.reported.wait(), 10)
    return ctx.results[0]


@pytest.fixture
async def executor() -> AsyncIterator[HandlerExecutor]:
    w = Worker()

    @w.action("plain")
    async def plain(ctx: ActionContext) -> dict[str, Any]:
        raise FlakyMirror("mirror 3 timed out")

    @w.action("sync-builtin")
    def sync_builtin(ctx: ActionContext) -> dict[str, Any]:
        raise TimeoutError("slow mirror")

    @w.action("chosen")
    async def chosen(ctx: ActionContext) -> dict[str, Any]:
        raise plait.ActionError("the mirror said 429", type="RateLimited")

    @w.action("sync-chosen")
    def sync_chosen(ctx: ActionContext) -> dict[str, Any]:
        raise plait.ActionError("quota spent for today", type="QuotaExhausted")

    @w.action("subclass")
    async def subclass(ctx: ActionContext) -> dict[str, Any]:
        raise RateLimited("back off")

    @w.action("untyped-action-error")
    async def untyped(ctx: ActionContext) -> dict[str, Any]:
        raise plait.ActionError("no type given")

    @w.action("message-looks-typed")
    async def looks_typed(ctx: ActionContext) -> dict[str, Any]:
        raise ValueError("RateLimited: a message is only text")

    @w.action("not-a-dict")
    async def not_a_dict(ctx: ActionContext) -> list[int]:
        return [1]

    @w.action("ok")
    async def ok(ctx: ActionContext) -> dict[str, Any]:
        return {}

    @w.action("slow")
    async def slow(ctx: ActionContext) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    ex = w.executor(slots=2)
    try:
        yield ex
    finally:
        await ex.aclose()


def test_action_error_is_exported_from_plait() -> None:
    assert plait.ActionError is ActionError
    assert "ActionError" in plait.__all__


@pytest.mark.parametrize(
    ("name", "error_type", "message"),
    [
        ("plain", "FlakyMirror", "FlakyMirror: mirror 3 timed out"),
        ("sync-builtin", "TimeoutError", "TimeoutError: slow mirror"),
        ("chosen", "RateLimited", "RateLimited: the mirror said 429"),
        ("sync-chosen", "QuotaExhausted", "QuotaExhausted: quota spent for today"),
        ("subclass", "RateLimited", "RateLimited: back off"),
        ("untyped-action-error", "ActionError", "ActionError: no type given"),
        ("message-looks-typed", "ValueError", "ValueError: RateLimited: a message is only text"),
    ],
)
async def test_a_handler_exception_sets_error_type(
    executor: HandlerExecutor, name: str, error_type: str, message: str
) -> None:
    r = await run(executor, name)
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert r.error_type == error_type
    assert r.error == message  # for people, as before
    assert r.error_code == Code.UNKNOWN


async def test_the_sdks_own_failures_and_other_outcomes_carry_no_type(
    executor: HandlerExecutor,
) -> None:
    r = await run(executor, "not-a-dict")
    assert r.outcome == pb.ACTION_OUTCOME_FAILED and r.error_code == Code.INVALID_ARGUMENT
    assert r.error_type == ""
    assert (await run(executor, "ok")).error_type == ""


async def test_an_async_handler_cancelled_before_it_starts_reports_once(
    executor: HandlerExecutor,
) -> None:
    # Cancelled in the same loop step as its start: the task never ran a line of the handler,
    # yet the executor must report (once), CANCELLED and untyped.
    ctx = FakeCtx("slow")
    executor.start(lease("slow", "slow"), ctx)
    executor.cancel("slow", "user cancelled")
    await asyncio.wait_for(ctx.reported.wait(), 10)
    again = FakeCtx("ok")  # one more attempt through the loop: no second report came
    executor.start(lease("ok", "ok"), again)
    await asyncio.wait_for(again.reported.wait(), 10)
    (result,) = ctx.results
    assert result.outcome == pb.ACTION_OUTCOME_CANCELLED and result.error == "user cancelled"
    assert result.error_type == ""


def test_an_action_error_type_the_coordinator_would_refuse_fails_at_once() -> None:
    with pytest.raises(ValueError, match="257 bytes; the limit is 256"):
        ActionError("x", type="T" * (MAX_ERROR_TYPE_BYTES + 1))
    with pytest.raises(ValueError, match="control character"):
        ActionError("x", type="Rate\nLimited")
    assert ActionError("x", type="T" * MAX_ERROR_TYPE_BYTES).type == "T" * MAX_ERROR_TYPE_BYTES


class Book:
    """An AttemptBook on a manual clock; what it would send is kept in ``sent``."""

    def __init__(self) -> None:
        self.sent: list[pb.ActionResult] = []
        clock = ManualClock()
        self.book = AttemptBook(
            "w1",
            4,
            [],
            clock=clock,
            hlc=HybridLogicalClock(clock),
            stats=SessionStats(),
            kill_grace=lambda: 1.0,
            on_started=lambda report: None,
            on_finished=lambda result, slots: self.sent.append(result),
            flush_soon=lambda: None,
        )

    def finish(self, result: AttemptResult) -> pb.ActionResult:
        from plait.worker.attempts import Attempt

        att = Attempt(self.book, f"l{len(self.sent)}", 1, 0, 0.0)
        self.book.finish(att, result)
        return self.sent[-1]


def test_the_result_on_the_wire_carries_the_type_of_a_failure_only() -> None:
    b = Book()
    sent = b.finish(AttemptResult.failed("RateLimited: 429", error_type="RateLimited"))
    assert sent.error_type == "RateLimited" and sent.error.message == "RateLimited: 429"
    timed_out = AttemptResult(pb.ACTION_OUTCOME_TIMED_OUT, error="late", error_type="X")
    assert b.finish(timed_out).error_type == ""  # a type goes with FAILED only
    assert b.finish(AttemptResult.failed("exit code 3", exit_code=3)).error_type == ""


def test_a_type_the_coordinator_would_refuse_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    # A class name over the limit (it would end the worker's stream): sent without a type,
    # the failure itself still reported.
    b = Book()
    long_name = "E" * (MAX_ERROR_TYPE_BYTES + 1)
    sent = b.finish(AttemptResult.failed("too long a name", error_type=long_name))
    assert sent.outcome == pb.ACTION_OUTCOME_FAILED and sent.error_type == ""
    assert sent.error.message == "too long a name"
    assert "sent without a type" in caplog.text
    assert b.finish(AttemptResult.failed("x", error_type="Bad\x00Type")).error_type == ""


async def test_sync_handler_error_type_is_reported_on_the_loop_thread(
    executor: HandlerExecutor,
) -> None:
    ctx = FakeCtx("sync-chosen")
    seen: list[threading.Thread] = []
    real = ctx.report

    def report(result: AttemptResult) -> None:
        seen.append(threading.current_thread())
        real(result)

    ctx.report = report  # type: ignore[method-assign]
    executor.start(lease("sync-chosen", "sync-chosen"), ctx)
    await asyncio.wait_for(ctx.reported.wait(), 10)
    assert seen == [threading.main_thread()]
    assert ctx.results[0].error_type == "QuotaExhausted"
