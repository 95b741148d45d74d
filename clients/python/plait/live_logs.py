"""Live logs: running attempts' output on its way to followers (foundation layer).

A worker sends what its attempts write while they run (``ConnectRequest.action_logs``, see
docs/protocol.md, "Live logs"); the coordinator keeps a bounded window of it per attempt in
memory and streams it to ``FollowActionLogs`` callers (``plait logs -f``). This module holds
the bounds both sides share and the worker's side: :class:`LiveOutput`, the output waiting to
be sent.

The worker's rules, all in :class:`LiveOutput`:

* **bounded**: at most :data:`LOG_CHUNK_BYTES` of each stream of each attempt waits; older
  bytes are dropped (the offsets show the gap), so a flood costs memory once and never slows
  the attempt (the pipes are read as fast as ever);
* **rate-limited**: the session sends what waits at most once per :data:`LOG_INTERVAL`, every
  attempt's output in one message (so a stream moves at most a chunk per interval);
* **nothing for quick attempts**: an attempt that ends before its output was first sent sends
  none of it (its result's tails carry it); one whose stream was already followed sends the
  rest before its result, so a follower sees the stream to its end.
"""

from __future__ import annotations

from collections.abc import Iterable

from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

__all__ = [
    "LOG_CHUNK_BYTES",
    "LOG_INTERVAL",
    "STDERR",
    "STDOUT",
    "LiveOutput",
    "logs_messages",
]

LOG_CHUNK_BYTES = 64 * 1024
"""The most one LogChunk carries, and the most of one stream of one attempt a worker holds."""
LOG_INTERVAL = 0.25
"""Seconds between a worker's ActionLogs messages (except to send a finished attempt's rest)."""
STDOUT: int = pb.LOG_STREAM_STDOUT
STDERR: int = pb.LOG_STREAM_STDERR
_MESSAGE_BYTES = 3 << 20  # ActionLogs messages stay well under the 4 MiB message limit


class _Lease:
    """One attempt's output: per stream the bytes waiting and where they start."""

    __slots__ = ("bufs", "offsets", "sent", "token")

    def __init__(self, token: int) -> None:
        self.token = token
        self.bufs = {STDOUT: bytearray(), STDERR: bytearray()}
        self.offsets = {STDOUT: 0, STDERR: 0}
        self.sent: set[int] = set()  # streams of which something has been sent

    def chunks(self, streams: Iterable[int]) -> list[pb.LogChunk]:
        out = []
        for stream in streams:
            buf = self.bufs[stream]
            if buf:
                out.append(
                    pb.LogChunk(
                        stream=pb.LogStream.ValueType(stream),
                        offset=self.offsets[stream],
                        data=bytes(buf),
                    )
                )
                self.offsets[stream] += len(buf)
                buf.clear()
                self.sent.add(stream)
        return out


class LiveOutput:
    """Output of a worker's running attempts until the session sends it (see the module
    docstring). Every method is called on the session's event loop."""

    __slots__ = ("_final", "_leases", "_waiting", "dropped_bytes")

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}
        self._waiting: set[str] = set()  # leases with bytes waiting
        self._final: list[wpb.LeaseLogs] = []  # the rest of finished attempts' streams
        self.dropped_bytes = 0
        """Bytes dropped because a stream outran the rate limit."""

    @property
    def waiting(self) -> bool:
        """Whether running attempts' output waits (sent when the rate limit allows)."""
        return bool(self._waiting)

    @property
    def final(self) -> bool:
        """Whether finished attempts' output waits (sent before their results, at once)."""
        return bool(self._final)

    def add(self, lease_id: str, token: int, stream: int, data: bytes) -> None:
        """Keeps ``data`` written by the attempt of ``lease_id`` to ``stream``."""
        if not data or stream not in (STDOUT, STDERR):
            return
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._leases[lease_id] = _Lease(token)
        buf = lease.bufs[stream]
        buf += data
        excess = len(buf) - LOG_CHUNK_BYTES
        if excess > 0:
            del buf[:excess]
            lease.offsets[stream] += excess
            self.dropped_bytes += excess
        self._waiting.add(lease_id)

    def finish(self, lease_id: str) -> None:
        """The attempt ended: the rest of each stream that was sent before leaves with the next
        flush (before the result); a stream never sent is dropped (the tails carry it)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        self._waiting.discard(lease_id)
        chunks = lease.chunks(sorted(lease.sent))
        if chunks:
            self._final.append(
                wpb.LeaseLogs(lease_id=lease_id, fencing_token=lease.token, chunks=chunks)
            )

    def take(self, *, running: bool) -> list[wpb.LeaseLogs]:
        """What to send now: finished attempts' rest, and (``running``) what running ones wrote."""
        out, self._final = self._final, []
        if running:
            for lease_id in self._waiting:
                lease = self._leases[lease_id]
                chunks = lease.chunks((STDOUT, STDERR))
                out.append(
                    wpb.LeaseLogs(lease_id=lease_id, fencing_token=lease.token, chunks=chunks)
                )
            self._waiting.clear()
        return out

    def clear(self) -> None:
        """Drops what waits (no stream to send it on); offsets go on, so a follower sees a gap."""
        for lease_id in self._waiting:
            lease = self._leases[lease_id]
            for stream, buf in lease.bufs.items():
                lease.offsets[stream] += len(buf)
                buf.clear()
        self._waiting.clear()
        self._final.clear()


def logs_messages(entries: list[wpb.LeaseLogs]) -> list[wpb.ConnectRequest]:
    """``entries`` in ActionLogs messages under the message size limit."""
    out: list[wpb.ConnectRequest] = []
    batch: list[wpb.LeaseLogs] = []
    size = 0
    for e in entries:
        approx = sum(len(c.data) for c in e.chunks) + len(e.lease_id) + 64
        if batch and size + approx > _MESSAGE_BYTES:
            out.append(wpb.ConnectRequest(action_logs=wpb.ActionLogs(leases=batch)))
            batch, size = [], 0
        batch.append(e)
        size += approx
    if batch:
        out.append(wpb.ConnectRequest(action_logs=wpb.ActionLogs(leases=batch)))
    return out
