"""Live logs on the coordinator: running attempts' output, in memory, for followers (edge layer).

The core accepts a worker's ``ActionLogs`` only from the session that holds the lease, with its
current fencing token (:mod:`~plait.coordinator.core.workers`), and returns the output as
:class:`~plait.coordinator.core.model.KeepLogs` effects. The runtime hands them here after the
batch's commit, and then the batch's records: an attempt's log closes when a record that ends
its lease is delivered, so everything its worker sent before the result (the result follows
the output on the stream) is in the log by then.

Nothing here is journalled; a restart forgets it (the results' tails are what stays). Memory
is bounded twice: each attempt keeps its newest ``attempt_bytes``, and all attempts together
``total_bytes``, the attempts written least recently losing their oldest output first. A
follower that falls behind what is kept sees a gap in the offsets, never an error.

:mod:`~plait.coordinator.services.logs` serves ``FollowActionLogs`` from this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from prometheus_client import Counter, Gauge

from plait.coordinator.core.model import KeepLogs
from plait.errors import UnavailableError
from plait.v1 import workflow_pb2 as pb

__all__ = ["ATTEMPT_BYTES", "TOTAL_BYTES", "AttemptLog", "LiveLogs"]

ATTEMPT_BYTES = 1 << 20
"""Output kept per running attempt (its newest bytes)."""
TOTAL_BYTES = 64 << 20
"""Output kept across all running attempts."""

E = pb  # EVENT_TYPE_* constants
# Records that end every lease of their action (core.apply: _ended, _retry_scheduled), and the
# one that ends the lease it names (a hedge's loss ends that attempt alone).
_ENDS_ACTION = frozenset(
    {
        E.EVENT_TYPE_ACTION_FINISHED,
        E.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        E.EVENT_TYPE_ACTION_CANCELLED,
        E.EVENT_TYPE_ACTION_SKIPPED,
    }
)
_ENDS_LEASE = E.EVENT_TYPE_LEASE_LOST


class AttemptLog:
    """One attempt's output as it arrived, newest kept, each chunk numbered from 0."""

    __slots__ = (
        "_changed",
        "action_id",
        "attempt",
        "bytes",
        "chunks",
        "ended",
        "first",
        "followers",
        "lease_id",
        "token",
        "version",
        "worker_id",
        "workflow_id",
    )

    def __init__(
        self, lease_id: str, workflow_id: str, action_id: str, attempt: int, token: int, worker: str
    ) -> None:
        self.lease_id = lease_id
        self.workflow_id = workflow_id
        self.action_id = action_id
        self.attempt = attempt
        self.token = token
        self.worker_id = worker
        self.chunks: list[pb.LogChunk] = []
        self.first = 0  # the number of chunks[0]
        self.bytes = 0
        self.ended = False
        self.followers = 0
        self.version = 0
        """Grows with every change (output kept, the end)."""
        self._changed = asyncio.Event()

    def append(self, chunks: Sequence[pb.LogChunk]) -> int:
        """Keeps ``chunks``; returns the bytes added."""
        added = 0
        for c in chunks:
            if c.data:
                self.chunks.append(c)
                added += len(c.data)
        self.bytes += added
        if added:
            self._wake()
        return added

    def drop_oldest(self, want: int) -> int:
        """Drops the oldest chunks, at least ``want`` bytes of them (or all); returns bytes."""
        freed = n = 0
        while n < len(self.chunks) and freed < want:
            freed += len(self.chunks[n].data)
            n += 1
        del self.chunks[:n]
        self.first += n
        self.bytes -= freed
        return freed

    def end(self) -> None:
        """The attempt has ended: no more output comes."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def read(self, cursor: int, offsets: dict[int, int]) -> tuple[list[pb.LogChunk], int]:
        """Chunks from number ``cursor`` on, less what lies before ``offsets`` (per stream,
        moved past what is returned); and the next cursor."""
        out = []
        for c in self.chunks[max(0, cursor - self.first) :]:
            start = offsets.get(c.stream, 0)
            end = c.offset + len(c.data)
            if end <= start:
                continue
            if c.offset < start:  # the caller has its start already (a resumed stream)
                out.append(
                    pb.LogChunk(stream=c.stream, offset=start, data=c.data[start - c.offset :])
                )
            else:
                out.append(c)
            offsets[c.stream] = end
        return out, self.first + len(self.chunks)

    async def changed(self, seen: int, within: float) -> None:
        """Returns once the log has changed since :attr:`version` was ``seen`` (output
        arrived, or the attempt ended), or after ``within`` seconds."""
        if self.version != seen:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)


class LiveLogs:
    """Every running attempt's log, bounded (see the module docstring)."""

    def __init__(
        self,
        attempt_bytes: int = ATTEMPT_BYTES,
        total_bytes: int = TOTAL_BYTES,
        *,
        kept: Gauge | None = None,
        dropped: Counter | None = None,
    ) -> None:
        """``kept`` and ``dropped`` (optional metrics) follow :attr:`total` and
        :attr:`dropped`."""
        self.attempt_bytes = attempt_bytes
        self.total_bytes = total_bytes
        self._kept_metric = kept
        self._dropped_metric = dropped
        self.total = 0
        """Bytes kept now."""
        self.dropped = 0
        """Bytes dropped to keep within the bounds."""
        # Open logs by lease id, the least recently written first (their order is eviction's).
        self._logs: dict[str, AttemptLog] = {}
        self._by_action: dict[tuple[str, str], set[str]] = {}
        self._waiting: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._closed = False

    def keep(self, batch: Sequence[KeepLogs]) -> None:
        """Keeps output the core accepted (called after its batch's commit)."""
        for k in batch:
            log = self._logs.pop(k.lease_id, None)
            if log is None:
                log = AttemptLog(
                    k.lease_id, k.workflow_id, k.action_id, k.attempt, k.token, k.worker_id
                )
                self._by_action.setdefault((k.workflow_id, k.action_id), set()).add(k.lease_id)
            self._logs[k.lease_id] = log  # now the most recently written
            self.total += log.append(k.chunks)
            if log.bytes > self.attempt_bytes:
                self._drop(log, log.bytes - self.attempt_bytes)
        if self.total > self.total_bytes:
            for log in list(self._logs.values()):  # the least recently written first
                self._drop(log, self.total - self.total_bytes)
                if not log.chunks and not log.followers:
                    self._forget(log)
                if self.total <= self.total_bytes:
                    break
        if self._kept_metric is not None:
            self._kept_metric.set(self.total)

    def _drop(self, log: AttemptLog, want: int) -> None:
        freed = log.drop_oldest(want)
        self.total -= freed
        self.dropped += freed
        if self._dropped_metric is not None:
            self._dropped_metric.inc(freed)

    def delivered(self, records: Sequence[pb.HistoryEvent]) -> None:
        """Closes the logs of attempts that ``records`` (a delivered commit) ended, and wakes
        followers waiting on their actions. Returns at once when nothing is open or awaited."""
        if not self._by_action and not self._waiting:
            return
        for ev in records:
            kind = ev.type
            key = (ev.workflow_id, ev.action_id)
            waiting = self._waiting.get(key)
            if waiting:
                for e in waiting:
                    e.set()
            if kind in _ENDS_ACTION:
                for lease_id in list(self._by_action.get(key, ())):
                    self._close(lease_id)
            elif kind == _ENDS_LEASE and ev.lease_id in self._logs:
                self._close(ev.lease_id)

    def _close(self, lease_id: str) -> None:
        log = self._logs.get(lease_id)
        if log is not None:
            self._forget(log)
            log.end()

    def _forget(self, log: AttemptLog) -> None:
        if self._logs.pop(log.lease_id, None) is None:
            return
        self.total -= log.bytes
        if self._kept_metric is not None:
            self._kept_metric.set(self.total)
        key = (log.workflow_id, log.action_id)
        leases = self._by_action.get(key)
        if leases is not None:
            leases.discard(log.lease_id)
            if not leases:
                del self._by_action[key]

    def follow(
        self, lease_id: str, workflow_id: str, action_id: str, attempt: int, token: int, worker: str
    ) -> AttemptLog:
        """The log of a live lease, for a follower (made empty when nothing arrived yet); the
        caller must have just seen the lease live in the core, and calls :meth:`unfollow`."""
        self._check_open()
        log = self._logs.get(lease_id)
        if log is None:
            log = AttemptLog(lease_id, workflow_id, action_id, attempt, token, worker)
            self._logs = {lease_id: log, **self._logs}  # written least recently: first
            self._by_action.setdefault((workflow_id, action_id), set()).add(lease_id)
        log.followers += 1
        return log

    def unfollow(self, log: AttemptLog) -> None:
        """A follower of ``log`` left."""
        log.followers -= 1
        if not log.followers and not log.chunks and not log.ended:
            self._forget(log)

    def end_stale(self, log: AttemptLog) -> None:
        """Closes a log whose lease the core no longer holds though no record said so (a
        follower's safety net; normally :meth:`delivered` closes it)."""
        if not log.ended:
            self._close(log.lease_id)
            log.end()

    @contextmanager
    def waiting(self, workflow_id: str, action_id: str) -> Iterator[asyncio.Event]:
        """An event set when a record of the action is delivered (a follower waits for an
        attempt to start, or for the action to end)."""
        self._check_open()
        key = (workflow_id, action_id)
        event = asyncio.Event()
        self._waiting.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[key]

    def close(self) -> None:
        """The coordinator is stopping: every follower's stream ends (UNAVAILABLE)."""
        self._closed = True
        for log in list(self._logs.values()):
            log.end()
        for events in self._waiting.values():
            for e in events:
                e.set()

    @property
    def closed(self) -> bool:
        """Whether the coordinator is stopping."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the coordinator is stopping; follow the logs again shortly")
