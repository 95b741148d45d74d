"""Typed errors end to end: a real coordinator, an SDK worker session on a real stream.

A handler's exception class (or a ``plait.ActionError``'s type) travels as
``ActionResult.error_type``; ``retryable_errors`` retries the listed types and no others, and
never reads a type out of the error message. A worker that sends a type over the limit has its
stream ended with INVALID_ARGUMENT naming ``error_type``, counted as refused input.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest

import plait
from plait.coordinator.server import CoordinatorServer
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from plait.worker import ActionContext, HandlerExecutor, SessionConfig, Worker, WorkerSession
from tests.integration.protocol_worker import ProtocolWorker
from tests.integration.test_coordinator_protocol import get, history, submit


class FlakyMirror(Exception):
    """Listed in the retry policy: retried."""


class CorruptInput(Exception):
    """Not listed: fails at once."""


def make_worker() -> Worker:
    w = Worker()

    @w.action("flaky")
    async def flaky(ctx: ActionContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise FlakyMirror("mirror 3 timed out")
        return {"attempt": ctx.attempt}

    @w.action("rate-limited")
    def rate_limited(ctx: ActionContext) -> dict[str, Any]:  # a sync handler, in the pool
        if ctx.attempt == 1:
            raise plait.ActionError("the mirror said 429", type="RateLimited")
        return {"attempt": ctx.attempt}

    @w.action("corrupt")
    async def corrupt(ctx: ActionContext) -> dict[str, Any]:
        raise CorruptInput(f"row 7 of attempt {ctx.attempt}")

    @w.action("looks-typed")
    async def looks_typed(ctx: ActionContext) -> dict[str, Any]:
        # The message starts with a listed type; the type is ValueError, which is not listed.
        raise ValueError(f"FlakyMirror: attempt {ctx.attempt} says so only in words")

    return w


def spec() -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="typed-errors")
    retry = s.defaults.retry
    retry.max_attempts = 3
    retry.retryable_errors.extend(["FlakyMirror", "RateLimited"])
    retry.initial_backoff.FromMilliseconds(10)
    retry.jitter = 0.0
    for action_id, handler in (
        ("flaky", "flaky"),
        ("rate-limited", "rate-limited"),
        ("corrupt", "corrupt"),
        ("looks-typed", "looks-typed"),
    ):
        s.actions.add(id=action_id, handler=handler)
    return s


@pytest.fixture
async def session(coordinator: CoordinatorServer) -> AsyncIterator[WorkerSession]:
    """An SDK worker session serving make_worker()'s handlers; stopped after the test."""
    config = SessionConfig(
        worker_id="typed",
        coordinator=f"127.0.0.1:{coordinator.port}",
        slots=4,
        reconnect_initial=timedelta(milliseconds=20),
        reconnect_max=timedelta(milliseconds=200),
    )
    executor = HandlerExecutor([make_worker()], 4)
    s = WorkerSession(config, [executor])
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        s.stop("test over")
        await asyncio.wait_for(task, 10)
        await executor.aclose()


async def events_until_finished(target: str, workflow_id: str) -> list[pb.HistoryEvent]:
    """The workflow's history, followed live until its WORKFLOW_FINISHED event."""
    events: list[pb.HistoryEvent] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = wsgrpc.WorkflowServiceStub(ch)
        request = wspb.WatchWorkflowRequest(workflow_id=workflow_id, follow=True)
        async for r in stub.WatchWorkflow(request):
            events.extend(r.events)
            if any(e.type == pb.EVENT_TYPE_WORKFLOW_FINISHED for e in r.events):
                break
    return events


@pytest.mark.timeout(60)
async def test_listed_error_types_are_retried_and_others_are_not(
    coordinator: CoordinatorServer, session: WorkerSession
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    workflow_id, _ = await submit(target, spec())
    events = await asyncio.wait_for(events_until_finished(target, workflow_id), 45)
    status = await get(target, workflow_id)
    by_id = {a.action_id: a for a in status.actions}
    leased: dict[str, int] = {}
    for e in events:
        if e.type == pb.EVENT_TYPE_ACTION_LEASED:
            leased[e.action_id] = leased.get(e.action_id, 0) + 1

    # Listed types: the first attempt failed, the second ran and succeeded.
    for action_id in ("flaky", "rate-limited"):
        a = by_id[action_id]
        assert a.state == pb.ACTION_STATE_SUCCEEDED, (action_id, a)
        assert a.attempt == 2 and leased[action_id] == 2, (action_id, a, leased)
    # Not listed: one attempt, failed; its error message is the human text, as before.
    corrupt = by_id["corrupt"]
    assert corrupt.state == pb.ACTION_STATE_FAILED and leased["corrupt"] == 1
    assert corrupt.error.message == "CorruptInput: row 7 of attempt 1"
    # A listed type named only in the message is not a type: not retried.
    looks = by_id["looks-typed"]
    assert looks.state == pb.ACTION_STATE_FAILED and leased["looks-typed"] == 1
    assert looks.error.message.startswith("ValueError: FlakyMirror:")
    assert status.state == pb.WORKFLOW_STATE_FAILED
    # The history keeps each failed attempt's type, as the worker reported it.
    typed = {
        (e.action_id, pb.EventType.Name(e.type)): e.error_type
        for e in events
        if e.type in (pb.EVENT_TYPE_ACTION_RETRY_SCHEDULED, pb.EVENT_TYPE_ACTION_FINISHED)
        and e.error_type
    }
    assert typed == {
        ("flaky", "EVENT_TYPE_ACTION_RETRY_SCHEDULED"): "FlakyMirror",
        ("rate-limited", "EVENT_TYPE_ACTION_RETRY_SCHEDULED"): "RateLimited",
        ("corrupt", "EVENT_TYPE_ACTION_FINISHED"): "CorruptInput",
        ("looks-typed", "EVENT_TYPE_ACTION_FINISHED"): "ValueError",
    }


def refused_count(coordinator: CoordinatorServer, field: str) -> float:
    url = f"http://127.0.0.1:{coordinator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    want = f'plait_input_refused_total{{field="{field}",source="worker"}}'
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == want:
            return float(value)
    return 0.0


@pytest.mark.timeout(30)
async def test_an_error_type_over_the_limit_ends_the_stream_naming_the_field(
    coordinator: CoordinatorServer,
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    w = ProtocolWorker(target, "hostile", slots=1)
    await w.connect()
    one = pb.WorkflowSpec(name="one")
    one.actions.add(id="a", handler="noop")
    workflow_id, _ = await submit(target, one)
    (lease,) = await w.grants(1)
    w.send(
        action_finished=wpb.ActionFinished(
            results=[
                wpb.ActionResult(
                    lease_id=lease.lease_id,
                    fencing_token=lease.fencing_token,
                    outcome=wpb.ACTION_OUTCOME_FAILED,
                    error={"code": 2, "message": "x"},
                    error_type="E" * 257,
                )
            ]
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await w.next("never", timeout=20, fail_fast=True)
    await w.close()
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "action_finished.results[0].error_type" in details, details
    assert "257 bytes; the limit is 256 bytes" in details, details
    # Nothing of the result was applied: the attempt neither finished nor is to be retried.
    types = {e.type for e in await history(target, workflow_id)}
    assert pb.EVENT_TYPE_ACTION_FINISHED not in types
    assert pb.EVENT_TYPE_ACTION_RETRY_SCHEDULED not in types
    field = "action_finished.results[].error_type"
    count = await asyncio.to_thread(refused_count, coordinator, field)
    assert count == 1
