"""Execute spans (plait.worker.spans) through the attempt book, as the session runs them.

Real executors (Python handlers, and workerd's exec executor running a real process), a real
SDK tracer with the in-memory exporter: the span is a child of the lease's traceparent, a
handler's own span is its child (async handlers and sync ones in pool threads), an exec action's
$TRACEPARENT names it, failures are ERROR, and an unsampled lease exports nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from plait.clock import SystemClock
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.v1 import workflow_pb2
from plait.worker.attempts import AttemptBook
from plait.worker.handlers import ActionContext, Worker
from plait.worker.session_config import SessionStats
from plait.worker.spans import SPAN_EXECUTE, ExecuteTracing
from plait.workerd.exec_executor import ExecExecutor
from tests.unit.exec_support import exec_lease, py

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = 0xB7AD6B7169203331
SAMPLED = f"00-{TRACE_ID:032x}-{PARENT:016x}-01"
UNSAMPLED = f"00-{TRACE_ID:032x}-{PARENT:016x}-00"

worker = Worker()


@worker.action("traced-async")
async def traced_async(ctx: ActionContext) -> dict[str, Any]:
    with trace.get_tracer("handler").start_as_current_span("handler.async.inner"):
        await asyncio.sleep(0)
    return {}


@worker.action("traced-sync")
def traced_sync(ctx: ActionContext) -> dict[str, Any]:
    with trace.get_tracer("handler").start_as_current_span("handler.sync.inner"):
        pass
    return {}


@worker.action("boom")
def boom(ctx: ActionContext) -> dict[str, Any]:
    raise RuntimeError("no disk")


class Observed:
    def __init__(self) -> None:
        self.finished: list[tuple[str, pb.ActionResult, float, str, str]] = []

    def attempt_finished(
        self, kind: str, result: pb.ActionResult, seconds: float, trace_id: str, cause: str
    ) -> None:
        self.finished.append((kind, result, seconds, trace_id, cause))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK provider, also global (as workerd sets it) so handlers' own spans reach it."""
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    # set_tracer_provider works once per process; the tests swap the global by hand.
    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        yield exp
    finally:
        trace._TRACER_PROVIDER = saved
    exp.shutdown()


def book_with(tracing: ExecuteTracing, observer: Observed, *executors: Any) -> AttemptBook:
    finished = asyncio.Event()

    def on_finished(result: pb.ActionResult, freed: int) -> None:
        finished.set()

    book = AttemptBook(
        "w1",
        4,
        list(executors),
        clock=SystemClock(),
        hlc=HybridLogicalClock(SystemClock()),
        stats=SessionStats(),
        kill_grace=lambda: 0.25,
        on_started=lambda report: None,
        on_finished=on_finished,
        flush_soon=lambda: None,
        tracing=tracing,
        observer=observer,
    )
    book.finished_event = finished  # type: ignore[attr-defined]
    return book


def handler_lease(handler: str, traceparent: str = SAMPLED, lease_id: str = "l-1") -> pb.Lease:
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf-1",
        action_id="a1",
        attempt=3,
        fencing_token=7,
        action=workflow_pb2.ActionSpec(id="a1", handler=handler),
        traceparent=traceparent,
    )


async def run_one(book: AttemptBook, lease: pb.Lease) -> None:
    done: asyncio.Event = book.finished_event  # type: ignore[attr-defined]
    done.clear()
    book.start(lease)
    await asyncio.wait_for(done.wait(), 20)


@pytest.mark.parametrize("handler", ["traced-async", "traced-sync"])
async def test_handler_runs_inside_the_execute_span(
    exporter: InMemorySpanExporter, handler: str
) -> None:
    observer = Observed()
    tracing = ExecuteTracing(trace.get_tracer_provider())
    book = book_with(tracing, observer, worker.executor(2))
    await run_one(book, handler_lease(handler))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    execute = spans[SPAN_EXECUTE]
    inner = spans[f"handler.{handler.split('-')[1]}.inner"]
    assert execute.context.trace_id == TRACE_ID
    assert execute.parent is not None and execute.parent.span_id == PARENT
    assert inner.parent is not None and inner.parent.span_id == execute.context.span_id
    assert inner.context.trace_id == TRACE_ID
    attrs = dict(execute.attributes or {})
    assert attrs["plait.workflow.id"] == "wf-1"
    assert attrs["plait.action.id"] == "a1"
    assert attrs["plait.action.attempt"] == 3
    assert attrs["plait.lease.fencing_token"] == 7
    assert attrs["plait.worker.id"] == "w1"
    assert attrs["plait.state"] == "succeeded"
    assert execute.status.status_code == StatusCode.UNSET
    ((kind, result, seconds, trace_id, cause),) = observer.finished
    assert (kind, result.outcome, trace_id, cause) == (
        "handler",
        pb.ACTION_OUTCOME_SUCCEEDED,
        f"{TRACE_ID:032x}",
        "",
    )
    assert seconds >= 0


async def test_failure_is_error_with_the_message(exporter: InMemorySpanExporter) -> None:
    book = book_with(ExecuteTracing(trace.get_tracer_provider()), Observed(), worker.executor(1))
    await run_one(book, handler_lease("boom"))
    (execute,) = exporter.get_finished_spans()
    assert execute.status.status_code == StatusCode.ERROR
    assert "RuntimeError: no disk" in (execute.status.description or "")
    assert dict(execute.attributes or {})["plait.state"] == "failed"


async def test_unsampled_lease_exports_nothing(exporter: InMemorySpanExporter) -> None:
    book = book_with(ExecuteTracing(trace.get_tracer_provider()), Observed(), worker.executor(1))
    await run_one(book, handler_lease("traced-sync", UNSAMPLED))
    assert exporter.get_finished_spans() == ()


async def test_cheap_path_makes_no_spans_but_keeps_the_context(
    exporter: InMemorySpanExporter,
) -> None:
    observer = Observed()
    book = book_with(ExecuteTracing(None), observer, worker.executor(1))
    await run_one(book, handler_lease("traced-sync"))
    # Only the handler's own span exists, still under the lease's attempt span.
    (inner,) = exporter.get_finished_spans()
    assert inner.name == "handler.sync.inner"
    assert inner.parent is not None and inner.parent.span_id == PARENT
    assert observer.finished[0][3] == f"{TRACE_ID:032x}"


async def test_exec_traceparent_names_the_execute_span(
    exporter: InMemorySpanExporter, tmp_path: Any
) -> None:
    observer = Observed()
    ex = ExecExecutor(tmp_root=str(tmp_path))
    book = book_with(ExecuteTracing(trace.get_tracer_provider()), observer, ex)
    lease = exec_lease(
        py(
            """
            import json, os
            with open(os.environ["PLAIT_OUTPUT"], "w") as f:
                json.dump({"tp": os.environ["TRACEPARENT"]}, f)
            raise SystemExit(0)
            """
        )
    )
    await run_one(book, lease)
    await ex.aclose()
    (execute,) = exporter.get_finished_spans()
    result = observer.finished[0][1]
    tp = json.loads(result.outputs_json)["tp"]
    sc = execute.context
    assert tp == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-01"
    assert execute.parent is not None
    assert f"{execute.parent.span_id:016x}" == lease.traceparent.split("-")[2]
    attrs = dict(execute.attributes or {})
    assert attrs["process.exit.code"] == 0
    assert attrs["plait.state"] == "succeeded"
    assert observer.finished[0][0] == "exec"


async def test_exec_failure_and_cheap_path_traceparent(
    exporter: InMemorySpanExporter, tmp_path: Any
) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path))
    book = book_with(ExecuteTracing(trace.get_tracer_provider()), Observed(), ex)
    await run_one(book, exec_lease(py("raise SystemExit(3)")))
    (execute,) = exporter.get_finished_spans()
    assert execute.status.status_code == StatusCode.ERROR
    assert execute.status.description == "exit code 3"
    assert dict(execute.attributes or {})["process.exit.code"] == 3
    # Without an exporter the action gets the lease's own traceparent.
    observer = Observed()
    cheap = book_with(ExecuteTracing(None), observer, ex)
    lease = exec_lease(
        py(
            """
            import json, os
            with open(os.environ["PLAIT_OUTPUT"], "w") as f:
                json.dump({"tp": os.environ["TRACEPARENT"]}, f)
            """
        ),
        lease_id="l-2",
    )
    await run_one(cheap, lease)
    await ex.aclose()
    assert json.loads(observer.finished[0][1].outputs_json)["tp"] == lease.traceparent


@worker.action("logs-async")
async def logs_async(ctx: ActionContext) -> dict[str, Any]:
    logging.getLogger("plait.test.handler").warning("from async")
    return {}


@worker.action("logs-sync")
def logs_sync(ctx: ActionContext) -> dict[str, Any]:
    logging.getLogger("plait.test.handler").warning("from sync")
    return {}


@pytest.mark.parametrize("handler", ["logs-async", "logs-sync"])
async def test_handler_log_lines_name_the_attempt_with_no_tracer_at_all(handler: str) -> None:
    """The cheapest path (no exporter, no provider installed anywhere): no OpenTelemetry object
    is made, yet a handler's log lines still carry the lease's trace and attempt ids."""
    import io

    from plait import logs

    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = None
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    try:
        logs.configure_logging("json", "INFO", stream=buf)
        book = book_with(ExecuteTracing(None), Observed(), worker.executor(1))
        await run_one(book, handler_lease(handler))
    finally:
        trace._TRACER_PROVIDER = saved
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    (line,) = [json.loads(x) for x in buf.getvalue().splitlines() if "from " in x]
    assert line["trace_id"] == f"{TRACE_ID:032x}"
    assert line["span_id"] == f"{PARENT:016x}"  # the coordinator's attempt span
    assert (line["workflow_id"], line["action_id"], line["lease_id"]) == ("wf-1", "a1", "l-1")
