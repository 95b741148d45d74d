"""``plait.v1.WorkerService`` (edge layer): one bidirectional stream per worker.

The servicer only moves messages: each incoming message becomes a stimulus for the core, and
whatever the core decides for this session arrives on the session's queue after it has been
journalled. The first message must be ``hello``.

Every message is checked here, against :class:`~plait.coordinator.config.Limits`, before it
becomes a stimulus (docs/operations.md, "Input limits"):

* a malformed message (a bad id, too many entries, an unknown outcome, an ``error_type`` over
  256 bytes or with a control character) ends the stream with INVALID_ARGUMENT naming the
  field and the limit; nothing of it reaches the core;
* a result whose outputs are too large or nest too deep becomes a failed attempt whose error
  names ``outputs_json`` and the limit (as oversized outputs always did);
* progress details over their limits are dropped (the report still counts as progress), tails
  longer than ``max_tail_bytes`` keep their end, an error over ``max_error_bytes`` its start,
  and a live-log chunk over ``plait.live_logs.LOG_CHUNK_BYTES`` its end.

Each of these is counted in ``plait_input_refused_total{source="worker"}`` and logged once a
minute per field and worker host.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.rpc import code_pb2, status_pb2

from plait.coordinator.auth import current_principal
from plait.coordinator.config import Limits
from plait.coordinator.core.events import WorkerMessageReceived
from plait.coordinator.core.model import SessionEnd
from plait.coordinator.runtime import Runtime
from plait.coordinator.services.errors import InputRefusals, Undecodable
from plait.errors import (
    AbortedError,
    AlreadyExistsError,
    FieldViolation,
    InvalidArgumentError,
    PermissionDeniedError,
    PlaitError,
    UnavailableError,
    error_type_problem,
)
from plait.ids import describe_id
from plait.jsonlimits import nesting_exceeds, utf8_len
from plait.live_logs import LOG_CHUNK_BYTES, STDERR, STDOUT
from plait.spec.validate import MAX_DURATION_S, labels_violations
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc

log = logging.getLogger(__name__)
MAX_SLOTS = 100_000
HELLO_TIMEOUT = 30.0
MAX_HANDLERS = 10_000  # Hello.handlers entries
MAX_REPORTS = 2 * MAX_SLOTS  # lease reports or results in one message
MAX_LEASE_ID = 1024  # characters of a reported lease id (ours are workflow/action/token)
BATCH_BYTES = 1 << 20  # the most one ConnectResponse.batch carries (grants are sized below)
MAX_TEXT = 1024  # Hello.agent, Hello.hostname, Hello.resume_token, Goodbye.reason
_OUTCOMES = frozenset(v for v in wpb.ActionOutcome.values() if v)
_LOG_STREAMS = frozenset((STDOUT, STDERR))
_REPORTS = ("action_started", "heartbeat")  # messages that are lists of LeaseReport


def check_hello(msg: wpb.ConnectRequest, limits: Limits | None = None) -> None:
    """INVALID_ARGUMENT, naming every bad field, for a bad first message."""
    if msg.WhichOneof("message") != "hello":
        raise InvalidArgumentError(
            [FieldViolation("message", "the first message on a Connect stream must be hello")]
        )
    lim = limits or Limits()
    hello = msg.hello
    v = []
    why = describe_id(hello.worker_id)
    if why:
        v.append(FieldViolation("hello.worker_id", why))
    if not 1 <= hello.slots <= MAX_SLOTS:
        v.append(FieldViolation("hello.slots", f"is {hello.slots}; must be 1 to {MAX_SLOTS}"))
    if not hello.handlers and not hello.exec_enabled:
        v.append(
            FieldViolation(
                "hello.handlers",
                "is empty and exec_enabled is false: a worker must be able to run something",
            )
        )
    if len(hello.handlers) > MAX_HANDLERS:
        v.append(
            FieldViolation(
                "hello.handlers", f"has {len(hello.handlers)} entries; the limit is {MAX_HANDLERS}"
            )
        )
    else:
        for i, h in enumerate(hello.handlers):
            why = describe_id(h)
            if why:
                v.append(FieldViolation(f"hello.handlers[{i}]", why))
    v.extend(labels_violations("hello.labels", hello.labels, lim))
    if len(hello.resources) > lim.max_resources:
        v.append(
            FieldViolation(
                "hello.resources",
                f"has {len(hello.resources)} entries; the limit max_resources is"
                f" {lim.max_resources}",
            )
        )
    for name, amount in hello.resources.items():
        if describe_id(name) or not (amount >= 0 and math.isfinite(amount)):
            v.append(
                FieldViolation(
                    f"hello.resources[{name!r}]",
                    "needs a name of [A-Za-z0-9_.-] and a finite amount >= 0",
                )
            )
            break
    for name in ("agent", "hostname", "resume_token"):
        text = getattr(hello, name)
        if len(text) > MAX_TEXT or not text.isprintable():
            v.append(
                FieldViolation(f"hello.{name}", f"must be at most {MAX_TEXT} printable characters")
            )
    v.extend(_report_violations("hello.running", hello.running))
    if v:
        raise InvalidArgumentError(v)


def _report_violations(
    path: str,
    reports: Sequence[wpb.LeaseReport | wpb.LeaseProgress | wpb.ActionResult | wpb.LeaseLogs],
) -> list[FieldViolation]:
    """A list of lease reports: bounded, each lease id bounded."""
    if len(reports) > MAX_REPORTS:
        return [FieldViolation(path, f"has {len(reports)} entries; the limit is {MAX_REPORTS}")]
    for i, r in enumerate(reports):
        if len(r.lease_id) > MAX_LEASE_ID:
            return [
                FieldViolation(f"{path}[{i}].lease_id", f"is longer than {MAX_LEASE_ID} characters")
            ]
    return []


class ReportCheck:
    """Checks one stream message after hello against the limits (see the module docstring).

    ``refusals`` counts and logs what it changes; ``peer`` names the worker in the log.
    """

    def __init__(self, limits: Limits, refusals: InputRefusals | None, peer: str = "") -> None:
        self.limits = limits
        self.refusals = refusals
        self.peer = peer
        self._heartbeat = 0  # the last Heartbeat.sequence on this stream

    def _note(self, field: str, description: str, what: str) -> None:
        if self.refusals is not None:
            self.refusals.refused("worker", field, description, peer=self.peer, what=what)

    def check(self, msg: wpb.ConnectRequest) -> None:
        """Raises InvalidArgumentError for a malformed message; trims what is over a limit."""
        kind = msg.WhichOneof("message")
        if kind in _REPORTS:
            v = _report_violations(f"{kind}.leases", getattr(msg, kind).leases)
            if kind == "heartbeat" and not v:
                v = self._sequence(msg.heartbeat.sequence)
        elif kind == "action_progress":
            v = self._progress(msg.action_progress)
        elif kind == "action_finished":
            v = self._finished(msg.action_finished)
        elif kind == "action_logs":
            v = self._logs(msg.action_logs)
        elif kind == "goodbye" and len(msg.goodbye.reason) > MAX_TEXT:
            msg.goodbye.reason = msg.goodbye.reason[:MAX_TEXT]
            v = []
        else:  # hello (the core refuses a second one), credit, or a kind this build lacks
            v = []
        if v:
            raise InvalidArgumentError(v)

    def _sequence(self, sequence: int) -> list[FieldViolation]:
        """Heartbeat.sequence starts at 1 and increases on a stream (its ack echoes it)."""
        if sequence <= self._heartbeat:
            last = self._heartbeat
            return [
                FieldViolation(
                    "heartbeat.sequence",
                    f"is {sequence}; must be >= 1 and greater than the stream's last ({last})",
                )
            ]
        self._heartbeat = sequence
        return []

    def _progress(self, progress: wpb.ActionProgress) -> list[FieldViolation]:
        v = _report_violations("action_progress.leases", progress.leases)
        if v:
            return v
        lim = self.limits
        for i, p in enumerate(progress.leases):
            details = p.details_json
            if not details:
                continue
            size = utf8_len(details)
            if size > lim.max_progress_bytes:
                why = f"is {size} bytes; the limit max_progress_bytes is {lim.max_progress_bytes}"
            elif nesting_exceeds(details, lim.max_json_depth):
                why = (
                    f"nests more than {lim.max_json_depth} levels deep; the limit"
                    f" max_json_depth is {lim.max_json_depth}"
                )
            else:
                continue
            p.details_json = ""
            self._note(
                f"action_progress.leases[{i}].details_json",
                why,
                f"details dropped (lease {p.lease_id[:200]!r}; the report still counts)",
            )
        return []

    def _logs(self, logs: wpb.ActionLogs) -> list[FieldViolation]:
        """Live output: a stream must be named; a chunk over LOG_CHUNK_BYTES keeps its end."""
        v = _report_violations("action_logs.leases", logs.leases)
        if v:
            return v
        for i, entry in enumerate(logs.leases):
            for j, chunk in enumerate(entry.chunks):
                path = f"action_logs.leases[{i}].chunks[{j}]"
                if chunk.stream not in _LOG_STREAMS:
                    return [
                        FieldViolation(
                            f"{path}.stream", f"is {chunk.stream}; must be STDOUT (1) or STDERR (2)"
                        )
                    ]
                excess = len(chunk.data) - LOG_CHUNK_BYTES
                if excess > 0:
                    chunk.data = chunk.data[excess:]
                    chunk.offset += excess
                    self._note(
                        f"{path}.data",
                        f"is {excess + LOG_CHUNK_BYTES} bytes; the limit is {LOG_CHUNK_BYTES}",
                        "truncated to its end",
                    )
        return []

    def _finished(self, finished: wpb.ActionFinished) -> list[FieldViolation]:
        v = _report_violations("action_finished.results", finished.results)
        if v:
            return v
        for i, res in enumerate(finished.results):
            if res.outcome not in _OUTCOMES:
                return [
                    FieldViolation(
                        f"action_finished.results[{i}].outcome",
                        f"is {res.outcome}; not an ActionOutcome (SUCCEEDED to TIMED_OUT)",
                    )
                ]
            why = error_type_problem(res.error_type) if res.error_type else None
            if why is not None:  # what retry policies match: never trimmed into another type
                return [FieldViolation(f"action_finished.results[{i}].error_type", why)]
            self._result(f"action_finished.results[{i}]", res)
        return []

    def _result(self, path: str, res: wpb.ActionResult) -> None:
        lim = self.limits
        if res.outputs_json:
            size = utf8_len(res.outputs_json)
            if size > lim.max_output_bytes:
                why = f"is {size} bytes; the limit max_output_bytes is {lim.max_output_bytes}"
            elif nesting_exceeds(res.outputs_json, lim.max_json_depth):
                why = (
                    f"nests more than {lim.max_json_depth} levels deep; the limit"
                    f" max_json_depth is {lim.max_json_depth}"
                )
            else:
                why = ""
            if why:
                res.outputs_json = ""
                if res.outcome == wpb.ACTION_OUTCOME_SUCCEEDED:
                    res.outcome = wpb.ACTION_OUTCOME_FAILED
                    res.error.CopyFrom(
                        status_pb2.Status(
                            code=code_pb2.INVALID_ARGUMENT, message=f"outputs_json {why}"
                        )
                    )
                self._note(f"{path}.outputs_json", why, f"the attempt fails ({res.lease_id!r})")
        for name in ("stdout_tail", "stderr_tail"):
            tail = getattr(res, name)
            if len(tail) > lim.max_tail_bytes // 4 and utf8_len(tail) > lim.max_tail_bytes:
                setattr(res, name, _last_bytes(tail, lim.max_tail_bytes))
                self._note(
                    f"{path}.{name}",
                    f"is {utf8_len(tail)} bytes; the limit max_tail_bytes is {lim.max_tail_bytes}",
                    "truncated to its end",
                )
        if res.HasField("error") and res.error.ByteSize() > lim.max_error_bytes:
            size = res.error.ByteSize()
            del res.error.details[:]
            res.error.message = _first_bytes(res.error.message, lim.max_error_bytes)
            self._note(
                f"{path}.error",
                f"is {size} bytes; the limit max_error_bytes is {lim.max_error_bytes}",
                "details dropped, message truncated",
            )
        d = res.duration
        if not (0 <= d.seconds <= MAX_DURATION_S and 0 <= d.nanos <= 999_999_999):
            res.ClearField("duration")
            self._note(f"{path}.duration", "is negative or not a valid Duration", "ignored")


def batched(msgs: list[wpb.ConnectResponse]) -> list[wpb.ConnectResponse]:
    """``msgs`` in as few ``Batch`` messages as fit :data:`BATCH_BYTES` each, each stamped with
    the HLC of its last message (the inner ones carry none); one alone goes as it is."""
    out: list[wpb.ConnectResponse] = []
    run: list[wpb.ConnectResponse] = []
    used = 0
    for msg in msgs:
        size = msg.ByteSize()
        if run and used + size > BATCH_BYTES:
            out.append(_batch(run))
            run, used = [], 0
        run.append(msg)
        used += size
    if run:
        out.append(_batch(run))
    return out


def _batch(run: list[wpb.ConnectResponse]) -> wpb.ConnectResponse:
    if len(run) == 1:
        return run[0]
    b = wpb.ConnectResponse()
    b.hlc.CopyFrom(run[-1].hlc)
    inner = b.batch.messages
    for msg in run:
        msg.ClearField("hlc")
        inner.append(msg)
    return b


def _last_bytes(text: str, limit: int) -> str:
    """The end of ``text``: at most ``limit`` UTF-8 bytes, whole characters only."""
    return text.encode("utf-8", "surrogatepass")[-limit:].decode("utf-8", "ignore")


def _first_bytes(text: str, limit: int) -> str:
    """The start of ``text``: at most ``limit`` UTF-8 bytes, whole characters only."""
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def check_identity(worker_id: str, enabled: bool) -> str:
    """The identity a stream proved, which must be the worker id its Hello claims.

    Returns the authenticated worker id ("" when authentication is off).

    Raises:
        PermissionDeniedError: the certificate or token names another worker (or none).
    """
    principal = current_principal()
    if not enabled:
        return ""
    if principal.worker_id != worker_id:
        proven = f"worker {principal.worker_id!r}" if principal.worker_id else "no worker identity"
        raise PermissionDeniedError(
            f"hello.worker_id {worker_id!r} does not match the caller's identity:"
            f" {principal.describe()} proves {proven}"
        )
    return worker_id


def _ended(end: SessionEnd) -> PlaitError:
    """The error a stream the coordinator ends is closed with."""
    if end.code == code_pb2.ALREADY_EXISTS:
        return AlreadyExistsError(end.message)
    if end.code == code_pb2.PERMISSION_DENIED:
        return PermissionDeniedError(end.message)
    if end.code == code_pb2.INVALID_ARGUMENT:
        return InvalidArgumentError([FieldViolation(end.field or "message", end.message)])
    if end.code == code_pb2.UNAVAILABLE:
        return UnavailableError(end.message)
    if end.code == code_pb2.INTERNAL:
        return PlaitError(end.message)  # INTERNAL
    return AbortedError(end.message)


class WorkerService(wgrpc.WorkerServiceServicer):
    """Moves worker messages into the core and the core's messages out to workers."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        auth_enabled: bool = False,
        limits: Limits | None = None,
        refusals: InputRefusals | None = None,
    ) -> None:
        self.runtime = runtime
        self.auth_enabled = auth_enabled
        self.limits = limits or runtime.config.limits
        self.refusals = refusals

    async def Connect(  # type: ignore[override]  # streams with context.write, not yield
        self, request_iterator: AsyncIterator[wpb.ConnectRequest], context: Any
    ) -> None:
        # The stream is read with context.read() and written with context.write(), not by
        # iterating request_iterator and yielding: every async-generator layer (gRPC's request
        # iterator, the interceptors' wrappers, this generator) costs a few task steps per
        # message, and a heartbeat and its ack are two messages of every worker every interval.
        #
        # Accepted (the interceptor authorized the call): say so before reading hello, so a
        # worker that waits for this before writing never races a refusal with its hello
        # (gRPC may then report the refusal as INTERNAL instead of its real status).
        await context.send_initial_metadata(())
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except TimeoutError:
            first = grpc.aio.EOF
        if first is grpc.aio.EOF:
            raise InvalidArgumentError(
                [FieldViolation("message", f"no hello within {HELLO_TIMEOUT:g}s")]
            )
        if isinstance(first, Undecodable):
            raise first.error("message")
        check_hello(first, self.limits)
        worker_id = first.hello.worker_id
        identity = check_identity(worker_id, self.auth_enabled)
        rt = self.runtime
        session_id, outbox = rt.open_session()
        peer = str(context.peer() or "")
        rt.post(
            WorkerMessageReceived(
                f"hello-{worker_id}",
                session_id,
                first,
                identity=identity,
                peer=peer,
                resume_token=secrets.token_urlsafe(32),
            )
        )
        reader = asyncio.create_task(
            _pump(
                context,
                rt,
                session_id,
                worker_id,
                outbox,
                ReportCheck(self.limits, self.refusals, peer),
            ),
            name=f"plait-worker-{worker_id}",
        )
        try:
            await _write(context, outbox, worker_id, batches=first.hello.accepts_batch)
        except PlaitError:
            raise
        except Exception:
            if context.cancelled():  # a write raced the worker going away: nothing to report
                return
            raise
        finally:
            reader.cancel()
            rt.close_session(session_id)


async def _pump(
    context: Any,
    rt: Runtime,
    session_id: str,
    worker_id: str,
    outbox: asyncio.Queue[Any],
    checker: ReportCheck,
) -> None:
    """Reads the stream after hello into the runtime until it ends; then ends the outbox.

    Each message is its own stimulus with its own cause ("heartbeat-w1-42": kind, worker,
    place on the stream), kept on every event it leads to and in the logs.
    """
    n = 0
    read, post, eof = context.read, rt.post, grpc.aio.EOF
    try:
        while True:
            msg = await read()
            if msg is eof:
                break
            if isinstance(msg, Undecodable):
                raise msg.error("message")
            checker.check(msg)
            n += 1
            kind = msg.WhichOneof("message")
            if kind == "goodbye":
                log.info("worker %s says goodbye: %s", worker_id, msg.goodbye.reason or "-")
            post(WorkerMessageReceived(f"{kind}-{worker_id}-{n}", session_id, msg))
    except PlaitError as e:  # a refused message ends the stream with its status
        outbox.put_nowait(e)
    except Exception as e:  # the stream broke: the session ends below
        log.info("worker %s stream ended: %s", worker_id, e)
    finally:
        outbox.put_nowait(None)


async def _write(
    context: Any, outbox: asyncio.Queue[Any], worker_id: str, *, batches: bool
) -> None:
    """Writes the session's outbox until it ends (None), or raises what ended it; with
    ``batches``, everything queued at once leaves in one stream write (ConnectResponse.batch)."""
    write, response = context.write, wpb.ConnectResponse
    held: Any = None  # what ended a run of messages taken for one batch
    while True:
        if held is not None:
            msg, held = held, None
        elif outbox.empty():
            msg = await outbox.get()
        else:
            msg = outbox.get_nowait()
        if isinstance(msg, response):
            if not batches or outbox.empty():
                await write(msg)
                continue
            run = [msg]
            while not outbox.empty():
                nxt = outbox.get_nowait()
                if not isinstance(nxt, response):
                    held = nxt
                    break
                run.append(nxt)
            for b in batched(run):
                await write(b)
            continue
        if msg is None:
            return
        if isinstance(msg, SessionEnd):
            log.warning("worker %s stream ended by the coordinator: %s", worker_id, msg.message)
            raise _ended(msg)
        raise msg  # a PlaitError: the reader refused a message
