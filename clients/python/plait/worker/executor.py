"""What a worker session asks of whatever runs attempts (foundation layer: plait.worker).

The session (:mod:`plait.worker.session`) speaks the protocol; an :class:`Executor` runs
attempts. The Python SDK's handler executor (:mod:`plait.worker.handlers`) and workerd's exec
executor (``plait.workerd.exec``) both implement this protocol, so one session serves both.

Contract:

* :meth:`Executor.start` is called on the event loop thread and must not block; it schedules the
  attempt and returns a handle at once.
* The executor calls :meth:`AttemptContext.report` exactly once per attempt, on the loop thread,
  whatever happens (success, failure, cancellation, an internal error).
* :meth:`Executor.cancel` asks an attempt to stop; it still reports (normally ``CANCELLED``).
* The attempt runs inside its execute span (:func:`attempt_trace`): a handler attached to its
  context, an exec action with ``TRACEPARENT`` naming it.
* Optionally (:func:`attempt_output`), an executor hands what its attempt writes to the session
  as it is written (``ctx.output``), for live logs; the tails in its result are still required.
* Optionally (:class:`FenceAware`), an executor hears every move of the session's fence
  deadline, so that something outside the session's event loop can kill its attempts on time
  even when the worker process is frozen (workerd's exec executor arms its keeper). Executors
  without ``fence_deadline`` are left alone: the session's own self-fencing still applies.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from plait import jsonlimits
from plait.v1 import worker_service_pb2 as pb
from plait.worker.spans import ExecuteSpan

SUCCEEDED = pb.ACTION_OUTCOME_SUCCEEDED
FAILED = pb.ACTION_OUTCOME_FAILED
CANCELLED = pb.ACTION_OUTCOME_CANCELLED
TIMED_OUT = pb.ACTION_OUTCOME_TIMED_OUT


class Code(enum.IntEnum):
    """The ``google.rpc.Code`` values results and acks use (fixed by google/rpc/code.proto)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13


# google.rpc.Code of the error that goes with each outcome unless the executor chooses one.
DEFAULT_ERROR_CODE: dict[int, int] = {
    FAILED: Code.UNKNOWN,
    CANCELLED: Code.CANCELLED,
    TIMED_OUT: Code.DEADLINE_EXCEEDED,
}

# Largest outputs object an attempt may return (exec's $PLAIT_OUTPUT or a handler's dict): the
# one constant the coordinator's max_output_bytes also defaults to (plait.jsonlimits).
MAX_OUTPUT_BYTES = jsonlimits.MAX_OUTPUT_BYTES

# Largest progress details (LeaseProgress.details_json, UTF-8) an attempt may report.
MAX_PROGRESS_BYTES = 64 * 1024


@dataclass(slots=True)
class AttemptResult:
    """How one attempt ended, before the session adds lease, token, duration and HLC.

    ``error_type`` (``ActionResult.error_type``, sent with a FAILED outcome only) is what
    ``RetryPolicy.retryable_errors`` matches: the handler's exception class name, or the type of
    a :class:`plait.ActionError`. The SDK's own failures (a bad return value, an unknown
    handler, an over-grant) and exec attempts leave it empty; their ``error_code`` name
    (``INVALID_ARGUMENT``, ``UNIMPLEMENTED``, ...) and exit code are what a policy matches.
    """

    outcome: pb.ActionOutcome.ValueType
    outputs_json: str = ""
    error: str = ""
    error_code: int = 0
    exit_code: int = 0
    stdout_tail: str = ""
    stderr_tail: str = ""
    error_type: str = ""

    @classmethod
    def failed(
        cls,
        message: str,
        *,
        code: int = Code.UNKNOWN,
        exit_code: int = 0,
        stdout_tail: str = "",
        stderr_tail: str = "",
        error_type: str = "",
    ) -> AttemptResult:
        """A FAILED result with ``message`` as the error (and ``error_type`` as its type)."""
        return cls(
            FAILED,
            error=message,
            error_code=code,
            exit_code=exit_code,
            stdout_tail=stdout_tail,
            stderr_tail=stderr_tail,
            error_type=error_type,
        )


class AttemptContext(Protocol):
    """What the session gives an executor for one attempt."""

    @property
    def lease_id(self) -> str:
        """The attempt's lease."""
        ...

    @property
    def kill_grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL (the coordinator's Welcome.kill_grace)."""
        ...

    def report(self, result: AttemptResult) -> None:
        """Delivers the attempt's result; call exactly once, on the loop thread."""
        ...

    def progress(self, details_json: str) -> None:
        """Queues a progress report (``LeaseProgress``); on the loop thread, any number of times.

        ``details_json`` is a JSON value of at most :data:`MAX_PROGRESS_BYTES`; the executor
        checks the bound. Reports after the result are ignored.
        """
        ...


class AttemptHandle(Protocol):
    """A running attempt, as its executor returns it from :meth:`Executor.start`."""

    def cancel(self, reason: str) -> None:
        """Asks the attempt to stop; it still reports a result."""
        ...


class Executor(Protocol):
    """Runs attempts of leases on behalf of a :class:`plait.worker.session.WorkerSession`."""

    @property
    def handlers(self) -> frozenset[str]:
        """Handler names (``ActionSpec.handler``) this executor serves."""
        ...

    @property
    def runs_exec(self) -> bool:
        """Whether this executor runs ``exec`` actions."""
        ...

    def start(self, lease: pb.Lease, ctx: AttemptContext) -> AttemptHandle:
        """Starts an attempt without blocking; the result arrives through ``ctx.report``."""
        ...

    def cancel(self, lease_id: str, reason: str) -> None:
        """Stops the attempt of ``lease_id`` if it runs here (TERM, then KILL after grace)."""
        ...

    async def aclose(self) -> None:
        """Stops every attempt still running and releases resources."""
        ...


@runtime_checkable
class FenceAware(Protocol):
    """An :class:`Executor` that also takes the session's fence deadline (optional hook)."""

    def fence_deadline(self, deadline: float, margin: float) -> None:
        """The fence moved: every attempt must be dead by monotonic time ``deadline``.

        ``deadline`` is when the coordinator may give the leases away (last acknowledged
        heartbeat's send time + lease TTL; ``time.monotonic()`` seconds, the same clock in
        every process of the host); ``margin`` is the head start the session keeps for its own
        kill (it SIGKILLs at ``deadline - margin`` after TERM and the kill grace). Called on the
        loop thread whenever either changes, running attempts or not; must not block.
        """
        ...


def attempt_trace(ctx: AttemptContext) -> ExecuteSpan | None:
    """The attempt's execute span when ``ctx`` carries one (the session's contexts do).

    Optional so that contexts made elsewhere (tests, other hosts of an executor) still work:
    their attempts simply run untraced.
    """
    trace = getattr(ctx, "trace", None)
    return trace if isinstance(trace, ExecuteSpan) else None


OutputSink = Callable[[int, bytes], None]
"""Takes output an attempt wrote: its LogStream (``plait.live_logs.STDOUT``/``STDERR``) and the
bytes; on the loop thread."""


def attempt_output(ctx: AttemptContext) -> OutputSink | None:
    """Where an executor hands its attempt's output for live logs, when ``ctx`` takes it (the
    session's contexts do: ``ctx.output``); None otherwise, and then only the tails report it."""
    output = getattr(ctx, "output", None)
    return output if callable(output) else None
