"""``plait logs -f``: an action's output as it is written, attempt after attempt (CLI layer).

Each attempt is followed with ``FollowActionLogs`` (:meth:`plait.Client.follow_logs`): its
stdout goes to stdout and its stderr to stderr as the worker sends them, control characters
escaped unless ``--raw``; a header line (on stderr) names each attempt and its worker. Output
the coordinator no longer held or the worker dropped (faster than its rate limit) is marked
``[... N bytes not shown ...]``. When an attempt ends, a stream that never arrived live (a
worker that does not stream, an attempt that was quick, or one that had ended already) is
printed from the result's tails. A retried action is followed into its next attempt; the
command returns 0 once the action has ended. ``-o json`` writes one JSON object per line
instead: ``{"attempt", "stream", "offset", "data"}`` per chunk, then ``{"attempt", "ended",
"action_state", "tails"}``.
"""

from __future__ import annotations

import codecs
import json
import sys
from typing import Any, TextIO

from plait.cli import render
from plait.cli.render import clean
from plait.client import Client
from plait.results import TERMINAL_ACTION_STATES
from plait.v1 import workflow_pb2, workflow_service_pb2

__all__ = ["follow"]

STDOUT: int = workflow_pb2.LOG_STREAM_STDOUT
STDERR: int = workflow_pb2.LOG_STREAM_STDERR
_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
_TERMINAL = TERMINAL_ACTION_STATES


class _Printer:
    """Writes one attempt's output to stdout and stderr (see the module docstring)."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in _NAMES}
        self.next = {STDOUT: 0, STDERR: 0}  # the offset each stream is printed up to
        self.live = {STDOUT: False, STDERR: False}

    @staticmethod
    def _file(stream: int) -> TextIO:
        return sys.stdout if stream == STDOUT else sys.stderr

    def chunk(self, c: workflow_pb2.LogChunk) -> None:
        if c.stream not in _NAMES:
            return
        if c.offset > self.next[c.stream]:
            self._flush_decoder(c.stream)
            skipped = c.offset - self.next[c.stream]
            print(f"[... {skipped} bytes not shown ...]", file=self._file(c.stream))
        self.next[c.stream] = c.offset + len(c.data)
        self.live[c.stream] = True
        self._write(c.stream, c.data)

    def _write(self, stream: int, data: bytes) -> None:
        f = self._file(stream)
        if self.raw:
            f.flush()
            f.buffer.write(data)
            f.buffer.flush()
            return
        text = self.decoders[stream].decode(data)
        if text:
            f.write(clean(text, multiline=True))
            f.flush()

    def _flush_decoder(self, stream: int) -> None:
        if not self.raw:
            rest = self.decoders[stream].decode(b"", final=True)
            if rest:
                self._file(stream).write(clean(rest, multiline=True))

    def end(self, tails: workflow_service_pb2.AttemptLogs | None) -> None:
        """The attempt ended: what never came live comes from its tails."""
        for stream in _NAMES:
            self._flush_decoder(stream)
            tail = ""
            if tails is not None and not self.live[stream]:
                tail = tails.stdout_tail if stream == STDOUT else tails.stderr_tail
            if tail:
                self._write(stream, tail.encode("utf-8", "surrogatepass"))
                if not tail.endswith("\n"):
                    self._write(stream, b"\n")
            self._file(stream).flush()


def _header(resp: workflow_service_pb2.FollowActionLogsResponse) -> str:
    worker = clean(resp.worker_id)
    return f"==> attempt {resp.attempt} (token {resp.fencing_token}, worker {worker}) <=="


def _json_lines(resp: workflow_service_pb2.FollowActionLogsResponse) -> None:
    for c in resp.chunks:
        line: dict[str, Any] = {
            "attempt": resp.attempt,
            "stream": _NAMES.get(c.stream, str(c.stream)),
            "offset": c.offset,
            "data": c.data.decode("utf-8", "replace"),
        }
        print(json.dumps(line), flush=True)
    if resp.ended:
        end: dict[str, Any] = {
            "attempt": resp.attempt,
            "ended": True,
            "action_state": render.action_state(resp.action_state),
        }
        if resp.HasField("tails"):
            end["tails"] = render.to_dict(resp.tails)
        print(json.dumps(end), flush=True)


def follow(client: Client, workflow_id: str, action_id: str, *, raw: bool, output: str) -> int:
    """Follows the action's attempts until the action ends; returns the exit code (0)."""
    attempt = 0
    while True:
        printer = _Printer(raw)
        last: workflow_service_pb2.FollowActionLogsResponse | None = None
        for resp in client.follow_logs(workflow_id, action_id, attempt):
            if output == "json":
                _json_lines(resp)
            else:
                if last is None and resp.attempt:
                    print(_header(resp), file=sys.stderr, flush=True)
                for c in resp.chunks:
                    printer.chunk(c)
                if resp.ended:
                    printer.end(resp.tails if resp.HasField("tails") else None)
            last = resp
        if last is None or last.attempt == 0 or last.action_state in _TERMINAL:
            if last is not None and last.attempt == 0 and output != "json":
                state = render.action_state(last.action_state)
                print(f"{clean(action_id)} ended ({state}) without running", file=sys.stderr)
            return 0
        attempt = last.attempt + 1
