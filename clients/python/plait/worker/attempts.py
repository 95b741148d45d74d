"""The worker's attempts and their results (foundation layer: plait.worker).

An :class:`AttemptBook` owns what a worker is doing and what it still owes the coordinator: the
running attempts and the slots they hold, the executor each lease is routed to, and every result
until a ``ResultAck`` for its (lease, token) arrives (**ack means durable**: the
:class:`~plait.worker.session.WorkerSession` re-sends unacked results after every reconnect).

It sends nothing itself. It tells the session through callbacks when an attempt has started
(queue a start report), made progress (queue a progress report), has finished (queue its
result, credit the slots it freed) and when queued reports should leave; the session batches
them onto the stream.

Each attempt runs inside an execute span (:mod:`plait.worker.spans`), opened here before its
executor starts and ended here with its result; an :class:`AttemptObserver` (workerd's metrics)
hears of every attempt that ends.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

from plait.clock import Clock
from plait.errors import error_type_problem
from plait.hlc import HybridLogicalClock
from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import (
    CANCELLED,
    DEFAULT_ERROR_CODE,
    FAILED,
    SUCCEEDED,
    AttemptHandle,
    AttemptResult,
    Code,
    Executor,
    FenceAware,
)
from plait.worker.session_config import SessionStats
from plait.worker.spans import ExecuteSpan, ExecuteTracing

__all__ = ["Attempt", "AttemptBook", "AttemptObserver", "CancelCause"]

CancelCause = Literal["cancelled", "lease_lost", "timeout", "other"]
"""Why the worker killed an attempt: the coordinator cancelled it (a user, a workflow's end),
its lease is lost or about to be (self-fencing, superseded, not adopted, refused), the
coordinator's run timeout, or the worker itself is stopping."""


class AttemptObserver(Protocol):
    """Hears of every attempt that ended (workerd's metrics implement it)."""

    def attempt_finished(
        self, kind: str, result: pb.ActionResult, seconds: float, trace_id: str, cause: str
    ) -> None:
        """``kind`` is ``exec`` or ``handler``; ``cause`` a :data:`CancelCause` or empty."""
        ...


_CANCEL_CAUSES: dict[int, CancelCause] = {
    pb.CANCEL_REASON_USER: "cancelled",
    pb.CANCEL_REASON_SUPERSEDED: "lease_lost",
    pb.CANCEL_REASON_TIMEOUT: "timeout",
    pb.CANCEL_REASON_UNKNOWN_LEASE: "lease_lost",
}
RECLAIMED = "reclaimed by the coordinator for a worker with a free slot"

# The session's logger: these lines always came from it, and log formats print the name.
log = logging.getLogger("plait.worker.session")


class Attempt:
    """One running attempt; also the :class:`AttemptContext` its executor reports through."""

    __slots__ = (
        "_book",
        "cancel_cause",
        "cancelling",
        "done",
        "handle",
        "kind",
        "lease_id",
        "slots",
        "started",
        "token",
        "trace",
    )

    def __init__(
        self, book: AttemptBook, lease_id: str, token: int, slots: int, started: float
    ) -> None:
        self._book = book
        self.lease_id = lease_id
        self.token = token
        self.slots = slots
        self.started = started
        self.handle: AttemptHandle | None = None
        self.done = False
        self.cancelling = False
        self.cancel_cause = ""
        self.kind = ""
        """``exec`` or ``handler`` once routed."""
        self.trace: ExecuteSpan | None = None
        """The attempt's execute span; executors run the attempt inside it."""

    @property
    def kill_grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL, as the coordinator's Welcome set them."""
        return self._book.kill_grace()

    def report(self, result: AttemptResult) -> None:
        """The executor's report that the attempt has ended."""
        self._book.finish(self, result)

    def progress(self, details_json: str) -> None:
        """The executor's progress report (dropped once the attempt has ended)."""
        if not self.done:
            self._book.progress(self, details_json)

    def output(self, stream: int, data: bytes) -> None:
        """Output the attempt wrote to ``stream`` (a LogStream), for live logs; on the loop
        thread, any number of times (dropped once the attempt has ended)."""
        if not self.done:
            self._book.output(self, stream, data)

    def cancel(self, reason: str, cause: CancelCause = "cancelled") -> None:
        """Asks the executor to kill the attempt (once); it still reports how it ended."""
        if self.cancelling or self.done:
            return
        self.cancelling = True
        self.cancel_cause = cause
        if self.handle is not None:
            self.handle.cancel(reason)


class AttemptBook:
    """Running attempts, the slots they hold, and results not yet acknowledged.

    ``on_started`` gets the start report of an attempt its executor is about to start;
    ``on_finished`` gets each result and the slots its attempt freed; ``flush_soon`` asks for the
    queued reports to be sent. Every method must be called on the session's event loop.
    """

    def __init__(
        self,
        worker_id: str,
        slots: int,
        executors: Sequence[Executor],
        *,
        clock: Clock,
        hlc: HybridLogicalClock,
        stats: SessionStats,
        kill_grace: Callable[[], float],
        on_started: Callable[[pb.LeaseReport], None],
        on_finished: Callable[[pb.ActionResult, int], None],
        flush_soon: Callable[[], None],
        on_progress: Callable[[pb.LeaseProgress], None] | None = None,
        on_output: Callable[[str, int, int, bytes], None] | None = None,
        tracing: ExecuteTracing | None = None,
        observer: AttemptObserver | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.slots = slots
        self.kill_grace = kill_grace
        self._clock = clock
        self._hlc = hlc
        self._stats = stats
        self._on_started = on_started
        self._on_finished = on_finished
        self._flush_soon = flush_soon
        self._on_progress = on_progress
        self._on_output = on_output
        self._tracing = tracing if tracing is not None else ExecuteTracing()
        self.observer = observer
        self._exec: Executor | None = None
        self._by_handler: dict[str, Executor] = {}
        self._fenced = [ex for ex in executors if isinstance(ex, FenceAware)]
        for ex in executors:
            if ex.runs_exec and self._exec is None:
                self._exec = ex
            for name in ex.handlers:
                if name in self._by_handler:
                    raise ValueError(f"handler {name!r} is served by two executors")
                self._by_handler[name] = ex
        self.attempts: dict[str, Attempt] = {}
        """Running attempts by lease id."""
        self.used = 0
        """Slots held by running attempts."""
        self.prefetch = 0
        """``Welcome.prefetch``: slots' worth of leases that may wait beyond the free slots."""
        self.queue: deque[pb.Lease] = deque()
        """Granted leases waiting for a slot (prefetch), oldest first."""
        self.unacked: dict[tuple[str, int], pb.ActionResult] = {}
        """Results by (lease_id, fencing_token) until the coordinator acknowledges them."""

    @property
    def handlers(self) -> list[str]:
        """Names of the handlers served, sorted (for Hello)."""
        return sorted(self._by_handler)

    @property
    def runs_exec(self) -> bool:
        """Whether some executor runs exec actions (for Hello)."""
        return self._exec is not None

    def running_reports(self) -> list[pb.LeaseReport]:
        """A report of every running attempt's lease and token."""
        return [
            pb.LeaseReport(lease_id=a.lease_id, fencing_token=a.token, slots=a.slots)
            for a in self.attempts.values()
        ]

    def held_reports(self) -> list[pb.LeaseReport]:
        """Every lease the worker holds: running attempts, then results not yet acked.

        Finished ones report 0 slots: they hold none, but their leases must stay granted
        until the re-sent result is committed (Hello.running after a reconnect).
        """
        reports = self.running_reports()
        reports += [
            pb.LeaseReport(
                lease_id=q.lease_id, fencing_token=q.fencing_token, slots=q.action.slots or 1
            )
            for q in self.queue
        ]
        reports += [pb.LeaseReport(lease_id=lid, fencing_token=tok) for lid, tok in self.unacked]
        return reports

    def fence_deadline(self, deadline: float, margin: float) -> None:
        """Tells every :class:`FenceAware` executor that the session's fence deadline moved."""
        for ex in self._fenced:
            try:
                ex.fence_deadline(deadline, margin)
            except Exception:  # a backstop's bug must not take the session down
                log.exception("executor %s failed to take the fence deadline", type(ex).__name__)

    def cancel(self, lease_id: str, reason: str, cause: CancelCause = "cancelled") -> bool:
        """Kills the attempt of ``lease_id`` (or drops it from the queue, reported CANCELLED
        unrun); False if it is neither running nor queued."""
        att = self.attempts.get(lease_id)
        if att is None:
            return self.hand_back(lease_id, reason)
        att.cancel(reason, cause)
        return True

    def cancelled(self, c: pb.LeaseCancellation) -> None:
        """The coordinator's cancellation of one lease: kills it (drops it if queued); a
        ``RECLAIMED`` one only if it has not started."""
        if c.reason == pb.CANCEL_REASON_RECLAIMED:
            self.hand_back(c.lease_id, RECLAIMED)
        elif c.lease_id in self.attempts or self.queue:
            why = f"cancelled by the coordinator ({pb.CancelReason.Name(c.reason)}) {c.message}"
            self.cancel(c.lease_id, why.strip(), _CANCEL_CAUSES.get(c.reason, "cancelled"))

    def hand_back(self, lease_id: str, reason: str) -> bool:
        """Drops a queued lease unrun and reports it CANCELLED (a reclaim, a cancellation);
        False if it is not queued (a started attempt goes on)."""
        lease = next((q for q in self.queue if q.lease_id == lease_id), None)
        if lease is None:
            return False
        self.queue.remove(lease)
        need = lease.action.slots or 1
        r = pb.ActionResult(lease_id=lease_id, fencing_token=lease.fencing_token, outcome=CANCELLED)
        r.error.code = Code.CANCELLED
        r.error.message = f"not started: {reason}"
        self._hlc.stamp(r.finished_hlc)
        self.unacked[(lease_id, lease.fencing_token)] = r
        self._on_finished(r, need)
        return True

    def refused(self, refusals: Iterable[pb.ResultAck]) -> int:
        """Kills the attempts whose start or progress the coordinator refused; returns how many.

        ``Ack.refused`` names leases this session does not hold (another session of the same
        worker does, or nobody): running one here would do the work twice, so it stops as if
        cancelled. Its result is then refused too and forgotten.
        """
        killed = 0
        for r in refusals:
            att = self.attempts.get(r.lease_id)
            if att is None or (r.fencing_token and r.fencing_token != att.token):
                continue  # not running here, or a refusal of another grant of the lease
            if att.cancelling or att.done:
                continue  # already being killed: later refusals of its reports say nothing new
            why = r.status.message or "lease not held by this session"
            log.warning(
                "lease %s (token %d) refused by the coordinator: %s; killing the attempt",
                r.lease_id,
                att.token,
                why,
            )
            att.cancel(f"refused by the coordinator: {why}", "lease_lost")
            killed += 1
        return killed

    def self_fence(self) -> int:
        """Kills every running attempt not already being killed and hands back every queued
        lease (their leases may be lost soon); returns how many attempts were killed."""
        for lease in list(self.queue):
            self.hand_back(lease.lease_id, "self-fenced: the lease could not be renewed in time")
        victims = [a for a in self.attempts.values() if not a.cancelling]
        for att in victims:
            att.cancel("self-fenced: the lease could not be renewed in time", "lease_lost")
        return len(victims)

    def cancel_all(self, reason: str, cause: CancelCause = "other") -> None:
        """Kills every running attempt and hands back every queued lease."""
        for lease in list(self.queue):
            self.hand_back(lease.lease_id, reason)
        for att in list(self.attempts.values()):
            att.cancel(reason, cause)

    def take(self, lease: pb.Lease) -> None:
        """Takes a granted lease: starts it, or queues it (prefetch) while the slots are busy."""
        lid, token = lease.lease_id, lease.fencing_token
        if (
            lid in self.attempts
            or (lid, token) in self.unacked
            or any(q.lease_id == lid for q in self.queue)
        ):
            log.warning("ignoring a second grant of lease %s (token %d)", lid, token)
            return
        need = lease.action.slots or 1
        if self.queue or self.used + need > self.slots:
            held = self.used + self.queued_slots + need
            if need <= self.slots and held <= self.slots + self.prefetch:
                self.queue.append(lease)
                self.start_queued()
                return
        self.start(lease)

    @property
    def queued_slots(self) -> int:
        """Slots the queued leases will take."""
        return sum(q.action.slots or 1 for q in self.queue)

    def start_queued(self) -> None:
        """Starts queued leases, oldest first, while the oldest fits the free slots."""
        queue = self.queue
        while queue and self.used + (queue[0].action.slots or 1) <= self.slots:
            self.start(queue.popleft())

    def start(self, lease: pb.Lease) -> None:
        """Starts an attempt of a granted lease on its executor, or reports why it cannot run."""
        lid, token = lease.lease_id, lease.fencing_token
        need = lease.action.slots or 1
        att = Attempt(self, lid, token, need, self._clock.monotonic())
        att.kind = "exec" if lease.action.WhichOneof("kind") == "exec" else "handler"
        att.trace = self._tracing.start(lease, self.worker_id)
        if self.used + need > self.slots:
            self._stats.over_grants += 1
            log.error(
                "over-grant (protocol error): lease %s needs %d slot(s), %d of %d free;"
                " reporting it FAILED",
                lid,
                need,
                self.slots - self.used,
                self.slots,
            )
            # It never held a slot, so no credit comes back for it.
            att.slots = 0
            self.finish(
                att,
                AttemptResult.failed(
                    f"worker {self.worker_id} was granted a lease needing {need} slot(s)"
                    f" with {self.slots - self.used} of {self.slots} free (over-grant)",
                    code=Code.RESOURCE_EXHAUSTED,
                ),
            )
            return
        self.attempts[lid] = att
        self.used += need
        executor = self._route(lease)
        if isinstance(executor, str):
            self.finish(att, AttemptResult.failed(executor, code=Code.UNIMPLEMENTED))
            return
        self._on_started(pb.LeaseReport(lease_id=lid, fencing_token=token))
        try:
            att.handle = executor.start(lease, att)
        except Exception as err:
            log.exception("could not start lease %s", lid)
            self.finish(
                att,
                AttemptResult.failed(
                    f"worker could not start the attempt: {err}", code=Code.INTERNAL
                ),
            )
            return
        self._flush_soon()

    def _route(self, lease: pb.Lease) -> Executor | str:
        kind = lease.action.WhichOneof("kind")
        if kind == "exec":
            return self._exec or f"worker {self.worker_id} does not run exec actions"
        if kind == "handler":
            name = lease.action.handler
            return self._by_handler.get(name) or (
                f"worker {self.worker_id} does not serve handler {name!r}"
            )
        return f"action {lease.action.id!r} has neither exec nor handler"

    def progress(self, att: Attempt, details_json: str) -> None:
        """Queues a progress report of a running attempt."""
        if self._on_progress is None or self.attempts.get(att.lease_id) is not att:
            return
        self._on_progress(
            pb.LeaseProgress(
                lease_id=att.lease_id, fencing_token=att.token, details_json=details_json
            )
        )

    def output(self, att: Attempt, stream: int, data: bytes) -> None:
        """Hands a running attempt's output on (lease, token, stream, bytes)."""
        if self._on_output is not None and self.attempts.get(att.lease_id) is att:
            self._on_output(att.lease_id, att.token, stream, data)

    def finish(self, att: Attempt, result: AttemptResult) -> None:
        """Records how an attempt ended (once) and keeps its result until it is acked."""
        if att.done:
            return
        att.done = True
        self.attempts.pop(att.lease_id, None)
        self.used -= att.slots
        outcome = result.outcome
        seconds = self._clock.monotonic() - att.started
        r = pb.ActionResult(
            lease_id=att.lease_id,
            fencing_token=att.token,
            outcome=outcome,
            outputs_json=result.outputs_json or ("{}" if outcome == SUCCEEDED else ""),
            exit_code=result.exit_code,
            stdout_tail=result.stdout_tail,
            stderr_tail=result.stderr_tail,
        )
        if outcome != SUCCEEDED or result.error:
            r.error.code = result.error_code or DEFAULT_ERROR_CODE.get(outcome, Code.UNKNOWN)
            r.error.message = result.error
        if outcome == FAILED and result.error_type:
            r.error_type = self._error_type(att, result.error_type)
        r.duration.FromNanoseconds(int(seconds * 1e9))
        self._hlc.stamp(r.finished_hlc)
        self.unacked[(att.lease_id, att.token)] = r
        trace = att.trace
        trace_id = ""
        if trace is not None:
            trace_id = trace.trace_id
            if trace.span is not None:
                trace.end(
                    outcome,
                    result.error,
                    exit_code=result.exit_code if att.kind == "exec" else None,
                )
        if self.observer is not None:
            try:
                self.observer.attempt_finished(att.kind, r, seconds, trace_id, att.cancel_cause)
            except Exception:  # a metrics bug must not lose a result
                log.exception("attempt observer failed on lease %s", att.lease_id)
        self._on_finished(r, att.slots)
        if self.queue:
            self.start_queued()

    def _error_type(self, att: Attempt, error_type: str) -> str:
        """``error_type`` if the coordinator will take it, else "" (it would end the stream)."""
        problem = error_type_problem(error_type)
        if problem is None:
            return error_type
        log.warning(
            "lease %s (token %d): error type %r %s; sent without a type",
            att.lease_id,
            att.token,
            error_type[:64],
            problem,
        )
        return ""

    def drop_results(self, reports: Iterable[pb.LeaseReport]) -> int:
        """Forgets the unacked results of leases ``Welcome.kill`` named: the coordinator no
        longer holds them, so such a result would only be refused (or, committed already,
        answered as a duplicate). Returns how many were dropped."""
        dropped = 0
        for r in reports:
            if self.unacked.pop((r.lease_id, r.fencing_token), None) is not None:
                dropped += 1
        return dropped

    def acked(self, acks: Iterable[pb.ResultAck]) -> None:
        """Forgets results the coordinator committed or refused; keeps the rest for a re-send."""
        for r in acks:
            key = (r.lease_id, r.fencing_token)
            if key not in self.unacked:
                continue
            code = r.status.code
            if code == Code.OK:
                self._stats.results_acked += 1
            elif code == Code.FAILED_PRECONDITION:
                self._stats.results_refused += 1
                log.warning(
                    "result of lease %s (token %d) refused: %s",
                    r.lease_id,
                    r.fencing_token,
                    r.status.message,
                )
            else:
                # Not committed and not refused: keep it for the next reconnect.
                log.warning(
                    "result of lease %s (token %d) not committed (code %d: %s); keeping it",
                    r.lease_id,
                    r.fencing_token,
                    code,
                    r.status.message,
                )
                continue
            del self.unacked[key]
