"""Python handlers: ``plait.Worker``, ``ActionContext`` and their executor (foundation layer).

A handler is a function registered with ``@worker.action("name")`` that takes an
:class:`ActionContext` and returns a JSON-serialisable ``dict`` (the action's outputs). Async
handlers run as tasks on the session's event loop (cancellation cancels the task); sync
handlers run in a thread pool sized to the worker's slots and are cancelled cooperatively
through ``ctx.cancelled`` — a late result is simply refused by fencing.

``ctx.heartbeat(details)`` reports progress from either kind of handler (from any thread): the
session batches it into ``ActionProgress`` and the coordinator resets the attempt's
``heartbeat_timeout``. ``ctx.item`` is a map child's item (``"item"`` in ``Lease.inputs_json``).

Both kinds run inside the attempt's execute span (:mod:`plait.worker.spans`): a span a handler
opens is its child, and log lines it writes carry its trace id (:mod:`plait.logs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import context as otel_context

from plait.errors import ActionError
from plait.jsonlimits import outputs_problem
from plait.live_logs import STDOUT
from plait.logs import bind_log_fields, log_fields
from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import (
    CANCELLED,
    MAX_OUTPUT_BYTES,
    MAX_PROGRESS_BYTES,
    SUCCEEDED,
    AttemptContext,
    AttemptResult,
    Code,
    attempt_output,
    attempt_trace,
)
from plait.worker.spans import ExecuteSpan, attached

log = logging.getLogger(__name__)

_LOG_TAIL_CHARS = 64 * 1024

Handler = Callable[["ActionContext"], Any]
F = TypeVar("F", bound=Handler)


def attempt_log_fields(lease: pb.Lease, trace: ExecuteSpan | None = None) -> dict[str, str]:
    """What log lines of an attempt carry (:mod:`plait.logs`): its workflow, action and lease
    ids, and its trace's ids (used when no OpenTelemetry span is current)."""
    fields = {
        "workflow_id": lease.workflow_id,
        "action_id": lease.action_id,
        "lease_id": lease.lease_id,
    }
    if trace is not None and trace.trace_id:
        fields["trace_id"] = trace.trace_id
        fields["span_id"] = trace.span_id
    return fields


@dataclass(frozen=True, slots=True)
class NeedResult:
    """The outcome of one action this one needs."""

    state: str
    """An ``ActionState`` name, e.g. ``ACTION_STATE_SUCCEEDED``."""
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """Whether the need succeeded."""
        return self.state == "ACTION_STATE_SUCCEEDED"


class CancelFlag(threading.Event):
    """A ``threading.Event`` that is also truthy once set: ``if ctx.cancelled: return``."""

    def __init__(self) -> None:
        # Not Event.__init__: most attempts are never cancelled nor waited on, so the Condition
        # (and its lock) is made on first use instead of once per attempt.
        self._flag = False

    @property
    def _cond(self) -> threading.Condition:
        d = self.__dict__
        cond = d.get("_lazy_cond")
        if cond is None:
            # setdefault is atomic: threads racing here all use the one that was stored.
            cond = d.setdefault("_lazy_cond", threading.Condition(threading.Lock()))
        return cond  # type: ignore[no-any-return]

    def __bool__(self) -> bool:
        return self.is_set()


def parse_inputs(inputs_json: str, input_json: str = "") -> tuple[Any, dict[str, NeedResult]]:
    """Parses ``Lease.inputs_json`` into (static input, needs by id).

    ``input_json`` (``ActionSpec.input_json``) is the fallback when ``inputs_json`` is empty.

    Raises:
        ValueError: the JSON is malformed or not shaped as the protocol says.
    """
    if not inputs_json:
        return (json.loads(input_json) if input_json else None), {}
    doc = json.loads(inputs_json)
    if not isinstance(doc, dict):
        raise ValueError(f"inputs_json must be a JSON object, got {type(doc).__name__}")
    raw_needs = doc.get("needs") or {}
    if not isinstance(raw_needs, dict):
        raise ValueError("inputs_json.needs must be a JSON object")
    needs: dict[str, NeedResult] = {}
    for need_id, need in raw_needs.items():
        if not isinstance(need, dict):
            raise ValueError(f"inputs_json.needs.{need_id} must be a JSON object")
        outputs = need.get("outputs") or {}
        needs[need_id] = NeedResult(
            state=str(need.get("state", "")),
            outputs=outputs if isinstance(outputs, dict) else {"value": outputs},
        )
    return doc.get("input"), needs


def parse_item(inputs_json: str) -> tuple[bool, Any]:
    """``(True, item)`` for a map child's ``Lease.inputs_json``, ``(False, None)`` without one.

    Raises:
        ValueError: the JSON is malformed.
    """
    if not inputs_json:
        return False, None
    doc = json.loads(inputs_json)
    if not isinstance(doc, dict) or "item" not in doc:
        return False, None
    return True, doc["item"]


ProgressSink = Callable[[str], None]
"""Takes a progress report's details JSON; safe to call from any thread."""


class ActionContext:
    """What a handler knows about the attempt it runs."""

    __slots__ = (
        "_input",
        "_input_json",
        "_inputs_json",
        "_item",
        "_log",
        "_log_chars",
        "_needs",
        "_output",
        "_progress",
        "action_id",
        "attempt",
        "cancel_reason",
        "cancelled",
        "fencing_token",
        "idempotency_key",
        "lease_id",
        "traceparent",
        "workflow_id",
    )

    def __init__(
        self,
        *,
        workflow_id: str = "",
        action_id: str = "",
        attempt: int = 1,
        fencing_token: int = 0,
        idempotency_key: str = "",
        traceparent: str = "",
        lease_id: str = "",
        inputs_json: str = "",
        input_json: str = "",
        progress: ProgressSink | None = None,
        output: ProgressSink | None = None,
    ) -> None:
        self.workflow_id = workflow_id
        self.action_id = action_id
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.idempotency_key = idempotency_key
        self.traceparent = traceparent
        self.lease_id = lease_id
        self.cancelled = CancelFlag()
        self.cancel_reason = ""
        self._inputs_json = inputs_json
        self._input_json = input_json
        self._input: Any = None
        self._needs: dict[str, NeedResult] | None = None
        self._item: tuple[bool, Any] | None = None
        self._progress = progress
        self._output = output
        self._log: list[str] = []
        self._log_chars = 0

    @classmethod
    def from_lease(
        cls,
        lease: pb.Lease,
        progress: ProgressSink | None = None,
        output: ProgressSink | None = None,
    ) -> ActionContext:
        """The context of one granted lease; ``progress`` receives its heartbeats, ``output``
        its log lines (live logs)."""
        return cls(
            workflow_id=lease.workflow_id,
            action_id=lease.action_id,
            attempt=lease.attempt,
            fencing_token=lease.fencing_token,
            idempotency_key=lease.idempotency_key,
            traceparent=lease.traceparent,
            lease_id=lease.lease_id,
            inputs_json=lease.inputs_json,
            input_json=lease.action.input_json,
            progress=progress,
            output=output,
        )

    def _parse(self) -> None:
        if self._needs is None:
            self._input, self._needs = parse_inputs(self._inputs_json, self._input_json)

    @property
    def input(self) -> Any:
        """The action's static input (parsed JSON), or ``None``."""
        self._parse()
        return self._input

    @property
    def needs(self) -> dict[str, NeedResult]:
        """Every needed action's outcome, by action id."""
        self._parse()
        assert self._needs is not None
        return self._needs

    @property
    def item(self) -> Any:
        """A map child's item (parsed JSON), or ``None`` when the action is not a map child."""
        if self._item is None:
            self._item = parse_item(self._inputs_json)
        return self._item[1]

    def heartbeat(self, details: Any = None) -> None:
        """Reports progress; the coordinator resets the attempt's ``heartbeat_timeout``.

        Never blocks and may be called from any thread (sync handlers run in a pool). Reports
        are batched: the coordinator gets at most one per lease per flush, the latest.

        Raises:
            ValueError: ``details`` is not JSON-serialisable, or its JSON is over 64 KiB.
        """
        try:
            text = json.dumps(details, separators=(",", ":"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"heartbeat details are not JSON-serialisable: {err}") from None
        size = len(text.encode())
        if size > MAX_PROGRESS_BYTES:
            raise ValueError(
                f"heartbeat details are {size} bytes of JSON, over the 64 KiB"
                f" ({MAX_PROGRESS_BYTES}-byte) limit"
            )
        if self._progress is not None:
            self._progress(text)

    def log(self, msg: str) -> None:
        """Adds a line to the attempt's log: followed live (``plait logs -f``) and reported as
        its stdout tail (bounded). May be called from any thread."""
        line = str(msg)
        if self._output is not None:
            self._output(line + "\n")
        self._log.append(line)
        self._log_chars += len(line) + 1
        while self._log_chars > _LOG_TAIL_CHARS and len(self._log) > 1:
            self._log_chars -= len(self._log.pop(0)) + 1
        log.debug("[%s/%s] %s", self.workflow_id, self.action_id, line)

    def log_tail(self) -> str:
        """The bounded log, newest last."""
        text = "\n".join(self._log)
        return text[-_LOG_TAIL_CHARS:]


def outputs_result(outputs: Any, ctx: ActionContext) -> AttemptResult:
    """The result for a handler's return value (``None`` means ``{}``)."""
    if outputs is None:
        outputs = {}
    if not isinstance(outputs, dict):
        return AttemptResult.failed(
            f"handler returned {type(outputs).__name__}, not a dict (JSON object) of outputs",
            code=Code.INVALID_ARGUMENT,
            stdout_tail=ctx.log_tail(),
        )
    try:
        text = json.dumps(outputs, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        return AttemptResult.failed(
            f"handler outputs are not JSON-serialisable: {err}",
            code=Code.INVALID_ARGUMENT,
            stdout_tail=ctx.log_tail(),
        )
    problem = outputs_problem(text, max_bytes=MAX_OUTPUT_BYTES)  # the coordinator's rule
    if problem is not None:
        too_big = len(text) > MAX_OUTPUT_BYTES  # json.dumps escapes to ASCII: chars are bytes
        return AttemptResult.failed(
            f"handler {problem}",
            code=Code.RESOURCE_EXHAUSTED if too_big else Code.INVALID_ARGUMENT,
            stdout_tail=ctx.log_tail(),
        )
    return AttemptResult(SUCCEEDED, outputs_json=text, stdout_tail=ctx.log_tail())


def exception_result(err: BaseException, ctx: ActionContext) -> AttemptResult:
    """The FAILED result for a handler that raised.

    Its ``error_type`` is the type a :class:`plait.ActionError` carries, else the exception's
    class name (``TimeoutError``): what ``retryable_errors`` matches. The message is for people.
    """
    tb = "".join(traceback.format_exception(err))
    error_type = err.type if isinstance(err, ActionError) else type(err).__name__
    return AttemptResult.failed(
        f"{error_type}: {err}",
        stdout_tail=ctx.log_tail(),
        stderr_tail=tb[-_LOG_TAIL_CHARS:],
        error_type=error_type,
    )


@dataclass(frozen=True, slots=True)
class _Registered:
    fn: Handler
    is_async: bool


class Worker:
    """A set of named Python handlers, and a way to serve them.

    Example::

        worker = plait.Worker()

        @worker.action("build-index")
        async def build_index(ctx: plait.ActionContext) -> dict[str, object]:
            return {"pages": len(ctx.needs)}

        worker.run(coordinator="127.0.0.1:7450")
    """

    def __init__(self) -> None:
        self._handlers: dict[str, _Registered] = {}

    def action(self, name: str) -> Callable[[F], F]:
        """Registers the decorated function (sync or async) as handler ``name``."""
        if not name:
            raise ValueError("a handler name must not be empty")

        def register(fn: F) -> F:
            if name in self._handlers:
                raise ValueError(f"handler {name!r} is already registered")
            self._handlers[name] = _Registered(fn, inspect.iscoroutinefunction(fn))
            return fn

        return register

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """Registered handlers by name."""
        return {name: reg.fn for name, reg in self._handlers.items()}

    def executor(self, slots: int) -> HandlerExecutor:
        """An executor serving this worker's handlers with a thread pool of ``slots``."""
        return HandlerExecutor([self], slots)

    def run(
        self,
        coordinator: str = "127.0.0.1:7450",
        worker_id: str | None = None,
        slots: int | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, float] | None = None,
        adaptive: bool = False,
        log_level: int | None = logging.INFO,
        **options: Any,
    ) -> None:
        """Serves the handlers until SIGINT/SIGTERM (graceful drain; a second one stops now).

        It logs what it does through :mod:`logging` (logger ``plait``): the handlers it serves,
        the coordinator it connected to, reconnects, draining. Unless the program configured
        logging itself, those lines go to stderr at ``log_level`` (``None``: leave logging
        alone; :func:`plait.worker.serve.default_logging`).

        ``resources`` add to (or override) the detected ``cpu`` and ``memory_mb`` advertised in
        ``Hello.resources``, e.g. ``{"gpu": 2}``. ``adaptive=True`` withholds slots while the
        host is overloaded (docs/workerd.md, "Adaptive concurrency"). ``options`` go to
        :func:`plait.worker.serve` (``executors``, ``clock``, ``reconnect_initial``,
        ``reconnect_max``, ``load_probe``, ...). Exec actions are not run unless an exec
        executor is passed in ``executors``.

        Credentials, unless ``options`` give them: ``tls`` from ``PLAIT_TLS_CA``/``_CERT``/
        ``_KEY``/``_SERVER_NAME`` (:func:`plait.security.tls_from_env`) and ``token`` from
        ``$PLAIT_TOKEN``, as :class:`plait.Client` does.
        """
        from plait.security import tls_from_env
        from plait.worker.serve import default_logging, serve

        if log_level is not None:
            default_logging(log_level)

        if "tls" not in options:
            options["tls"] = tls_from_env()
        if "token" not in options:
            options["token"] = os.environ.get("PLAIT_TOKEN", "")

        asyncio.run(
            serve(
                [self],
                coordinator=coordinator,
                worker_id=worker_id,
                slots=slots,
                labels=labels,
                resources=resources,
                adaptive=adaptive,
                install_signal_handlers=True,
                **options,
            )
        )


class _Running:
    """A handler attempt in flight; the handle the session cancels through."""

    __slots__ = ("ctx", "task")

    def __init__(self, ctx: ActionContext, task: asyncio.Future[Any] | None) -> None:
        self.ctx = ctx
        self.task = task

    def cancel(self, reason: str) -> None:
        self.ctx.cancel_reason = reason
        self.ctx.cancelled.set()
        if isinstance(self.task, asyncio.Task):
            self.task.cancel(reason)


class HandlerExecutor:
    """Runs handler leases: async handlers as loop tasks, sync ones in a thread pool."""

    runs_exec = False

    def __init__(self, workers: list[Worker], slots: int) -> None:
        self._handlers: dict[str, _Registered] = {}
        for w in workers:
            for name, reg in w._handlers.items():
                if name in self._handlers:
                    raise ValueError(f"handler {name!r} is registered twice")
                self._handlers[name] = reg
        self._slots = max(1, slots)
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[str, _Running] = {}

    @property
    def handlers(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def start(self, lease: pb.Lease, ctx: AttemptContext) -> _Running:
        reg = self._handlers[lease.action.handler]
        loop = asyncio.get_running_loop()

        def progress(details_json: str) -> None:
            # Sync handlers call this from pool threads; the session lives on the loop.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(ctx.progress, details_json)

        sink = attempt_output(ctx)
        output = None
        if sink is not None:
            loop_thread = threading.get_ident()

            def output(text: str) -> None:  # live logs: ctx.log lines, as stdout
                data = text.encode("utf-8", "replace")
                if threading.get_ident() == loop_thread:  # an async handler: before its result
                    sink(STDOUT, data)
                    return
                with contextlib.suppress(RuntimeError):  # a sync one: ahead of its result
                    loop.call_soon_threadsafe(sink, STDOUT, data)

        actx = ActionContext.from_lease(lease, progress, output)
        trace = attempt_trace(ctx)
        otel_ctx = trace.context if trace is not None else None
        fields = attempt_log_fields(lease, trace)
        if reg.is_async:
            running = _Running(actx, None)
            # The task runs in a copy of the current contextvars: attach the span inside it.
            running.task = task = loop.create_task(
                self._run_async(reg.fn, actx, ctx, otel_ctx, fields)
            )
            task.add_done_callback(lambda _: self._async_done(running, ctx))
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._slots, thread_name_prefix="plait-handler")
            fn = reg.fn

            def call_in_span() -> Any:
                # Pool threads do not inherit the loop's context, and keep theirs from one
                # attempt to the next: attach the span and log fields for the call only.
                with attached(otel_ctx), log_fields(**fields):
                    return fn(actx)

            fut = loop.run_in_executor(self._pool, call_in_span)
            running = _Running(actx, fut)
            fut.add_done_callback(lambda f: self._sync_done(f, actx, ctx))
        self._running[lease.lease_id] = running
        return running

    async def _run_async(
        self,
        fn: Callable[[ActionContext], Awaitable[Any]],
        actx: ActionContext,
        ctx: AttemptContext,
        otel_ctx: otel_context.Context | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        # This task's context is its own copy, gone with it: bind, nothing to undo.
        if otel_ctx is not None:
            otel_context.attach(otel_ctx)
        if fields:
            bind_log_fields(**fields)
        try:
            out = await fn(actx)
        except asyncio.CancelledError:
            result = AttemptResult(
                CANCELLED, error=actx.cancel_reason or "cancelled", stdout_tail=actx.log_tail()
            )
        except Exception as err:
            result = exception_result(err, actx)
        else:
            result = outputs_result(out, actx)
        self._running.pop(actx.lease_id, None)
        ctx.report(result)

    def _async_done(self, running: _Running, ctx: AttemptContext) -> None:
        # A task cancelled before its first step never entered _run_async's try: report for it.
        if self._running.get(running.ctx.lease_id) is running:
            self._running.pop(running.ctx.lease_id, None)
            actx = running.ctx
            ctx.report(AttemptResult(CANCELLED, error=actx.cancel_reason or "cancelled"))

    def _sync_done(
        self, fut: asyncio.Future[Any], actx: ActionContext, ctx: AttemptContext
    ) -> None:
        self._running.pop(actx.lease_id, None)
        if actx.cancelled.is_set():
            result = AttemptResult(
                CANCELLED, error=actx.cancel_reason or "cancelled", stdout_tail=actx.log_tail()
            )
        elif fut.cancelled():
            result = AttemptResult(CANCELLED, error="cancelled")
        elif (err := fut.exception()) is not None:
            result = exception_result(err, actx)
        else:
            result = outputs_result(fut.result(), actx)
        ctx.report(result)

    def cancel(self, lease_id: str, reason: str) -> None:
        running = self._running.get(lease_id)
        if running is not None:
            running.cancel(reason)

    async def aclose(self) -> None:
        for running in list(self._running.values()):
            running.cancel("worker exiting")
        tasks = [r.task for r in self._running.values() if isinstance(r.task, asyncio.Task)]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._pool is not None:
            # Sync handlers cannot be interrupted; do not wait for them.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
