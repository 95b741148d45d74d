"""What a worker session sends, and how (foundation layer: plait.worker).

:class:`ConnectStream` wraps one ``WorkerService.Connect`` call with a single writer task, so
writes never interleave. :class:`Outbox` holds what happened in one event-loop turn -- attempts
started, results, slots freed -- until the :class:`~plait.worker.session.WorkerSession` flushes it
on the next turn, as one message of each kind (**batching**); :func:`result_messages` cuts
results into ``ActionFinished`` chunks that stay under the message size limit. Progress reports
(``ActionProgress``) wait in the outbox too, the latest per lease, until the
:class:`ProgressThrottle` lets them out, at most once per ``SessionConfig.progress_interval``
(:func:`progress_messages`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from plait.clock import Clock
from plait.v1 import worker_service_pb2 as pb

__all__ = [
    "ConnectStream",
    "Outbox",
    "OutboxBatch",
    "ProgressThrottle",
    "progress_messages",
    "result_messages",
]

_BATCH_BYTES = 3 << 20  # ActionFinished chunks stay well under the 4 MiB message limit


class ConnectStream:
    """One Connect call: a single writer task drains the queue, so writes never interleave."""

    __slots__ = ("abort_reason", "call", "queue")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        self.abort_reason = ""

    async def write_loop(self) -> None:
        """Writes queued messages in order; ``None`` half-closes the stream and ends the loop."""
        while True:
            msg = await self.queue.get()
            if msg is None:
                await self.call.done_writing()
                return
            await self.call.write(msg)

    def abort(self, reason: str) -> None:
        """Cancels the call (once), remembering why."""
        if not self.abort_reason:
            self.abort_reason = reason
            self.call.cancel()


def result_messages(
    results: Sequence[pb.ActionResult],
    credit: int = 0,
    started: Sequence[pb.LeaseReport] = (),
) -> list[pb.ConnectRequest]:
    """Results in ActionFinished chunks; ``credit`` and ``started`` ride with the first one."""
    out: list[pb.ConnectRequest] = []
    batch: list[pb.ActionResult] = []
    size = 0
    for r in results:
        approx = (
            len(r.outputs_json)
            + len(r.stdout_tail)
            + len(r.stderr_tail)
            + len(r.error.message)
            + 128
        )
        if batch and size + approx > _BATCH_BYTES:
            finished = pb.ActionFinished(results=batch, credit=credit, started=started)
            out.append(pb.ConnectRequest(action_finished=finished))
            batch, size, credit, started = [], 0, 0, ()
        batch.append(r)
        size += approx
    if batch:
        finished = pb.ActionFinished(results=batch, credit=credit, started=started)
        out.append(pb.ConnectRequest(action_finished=finished))
    return out


def progress_messages(reports: Sequence[pb.LeaseProgress]) -> list[pb.ConnectRequest]:
    """Progress reports in ActionProgress chunks under the message size limit."""
    out: list[pb.ConnectRequest] = []
    batch: list[pb.LeaseProgress] = []
    size = 0
    for p in reports:
        approx = len(p.details_json) + len(p.lease_id) + 32
        if batch and size + approx > _BATCH_BYTES:
            out.append(pb.ConnectRequest(action_progress=pb.ActionProgress(leases=batch)))
            batch, size = [], 0
        batch.append(p)
        size += approx
    if batch:
        out.append(pb.ConnectRequest(action_progress=pb.ActionProgress(leases=batch)))
    return out


class ProgressThrottle:
    """Lets queued progress out at most once per interval; when held back, flushes again later."""

    __slots__ = ("_clock", "_interval", "_next", "_timer", "_wake")

    def __init__(self, clock: Clock, interval: float, wake: Callable[[], None]) -> None:
        self._clock = clock
        self._interval = interval
        self._wake = wake
        self._next = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def ready(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether progress may be sent now (then the next send waits an interval).

        If not, ``wake`` is called on ``loop`` once it may (one timer at a time).
        """
        now = self._clock.monotonic()
        if now < self._next:
            if self._timer is None:
                self._timer = loop.call_later(self._next - now, self._due)
            return False
        self._next = now + self._interval
        return True

    def cancel(self) -> None:
        """Cancels a pending wake-up (the session is ending)."""
        if self._timer is not None:
            self._timer.cancel()

    def _due(self) -> None:
        self._timer = None
        self._wake()


class OutboxBatch(NamedTuple):
    """What one flush sends."""

    started: list[pb.LeaseReport]
    """Start reports of attempts that have not already finished."""
    finished: list[pb.ActionResult]
    credit: int
    """Slots freed (0 while draining): with the results if there are any, else on its own."""


class Outbox:
    """Start reports, results and freed slots of one loop turn, until they leave together."""

    __slots__ = ("_credit", "_finished", "_progress", "_started")

    def __init__(self) -> None:
        self._started: list[pb.LeaseReport] = []
        self._finished: list[pb.ActionResult] = []
        self._credit = 0
        self._progress: dict[str, pb.LeaseProgress] = {}

    def credit(self, slots: int) -> None:
        """Queues credit that no result carries (slots released by adaptive concurrency)."""
        self._credit += slots

    def progress(self, report: pb.LeaseProgress) -> None:
        """Queues a progress report; a newer one for the same lease replaces it."""
        self._progress.pop(report.lease_id, None)
        self._progress[report.lease_id] = report

    @property
    def has_progress(self) -> bool:
        """Whether progress reports wait to be sent."""
        return bool(self._progress)

    def take_progress(self) -> list[pb.LeaseProgress]:
        """Empties the queued progress reports, oldest lease first."""
        reports = list(self._progress.values())
        self._progress.clear()
        return reports

    @property
    def only_starts(self) -> bool:
        """Whether start reports are all that waits (no result, credit or progress)."""
        return bool(self._started) and not (self._finished or self._credit or self._progress)

    def started(self, report: pb.LeaseReport) -> None:
        """Queues the start report of an attempt."""
        self._started.append(report)

    def finished(self, result: pb.ActionResult, credit: int) -> None:
        """Queues a result and the slots it gives back; its pending progress is moot."""
        self._credit += credit
        self._finished.append(result)
        self._progress.pop(result.lease_id, None)

    def forget_credit(self) -> None:
        """Drops the queued credit: a draining worker takes no new work."""
        self._credit = 0

    def forget_results(self) -> None:
        """Drops the queued results: they were just re-sent with every other unacked one."""
        self._finished.clear()

    def forget_reports(self) -> None:
        """Drops start, progress reports and results (not credit): no stream to send them on."""
        self._started.clear()
        self._finished.clear()
        self._progress.clear()

    def reset(self) -> None:
        """Drops everything: the coordinator's ledger restarts from a new Hello."""
        self._credit = 0
        self._started.clear()
        self._finished.clear()
        self._progress.clear()

    def take(self, *, draining: bool) -> OutboxBatch:
        """Empties the outbox into what to send now."""
        started, finished = self._started, self._finished
        if started and finished:
            # An attempt that already finished needs no start report: its result implies it
            # (and the coordinator journals one event fewer).
            done = {r.lease_id for r in finished}
            started = [s for s in started if s.lease_id not in done]
        credit = 0 if draining else self._credit
        self._started, self._finished, self._credit = [], [], 0
        return OutboxBatch(started, finished, credit)
