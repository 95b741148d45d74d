"""The web UI's live streams (edge layer): server-sent events over the API's own streams.

``/api/workflows/{id}/events`` is ``WatchWorkflow``: the history after a sequence, then every
event as it is committed. Each SSE message carries one batch and the sequence of its last
event as its ``id``, so a browser that reconnects (``EventSource`` sends ``Last-Event-ID``)
resumes after the last event it saw, on this coordinator or, after a failover, the next.

``/api/workflows/{id}/actions/{action}/logs`` is ``FollowActionLogs``: a running attempt's
output as its worker sends it, then the next attempt's, until the action ends; its ``id`` is
``attempt:stdout_offset:stderr_offset``, from which a reconnect resumes.

Both are authorized as the RPC they serve. A comment line every ``KEEPALIVE`` seconds keeps
idle connections open through proxies and finds browsers that went away.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from plait.coordinator.core.transitions import TERMINAL
from plait.coordinator.ui import convert
from plait.coordinator.ui.access import HttpCall
from plait.coordinator.ui.api import UiApi, error_body, http_status, json_response
from plait.errors import FieldViolation, InvalidArgumentError, PlaitError
from plait.live_logs import STDERR, STDOUT
from plait.v1 import workflow_service_pb2 as wspb

__all__ = ["KEEPALIVE", "UiStreams"]

log = logging.getLogger(__name__)

KEEPALIVE = 15.0  # seconds between comment lines on an idle stream
RETRY_MS = 2000  # how soon a browser reconnects (the SSE "retry" field)
_STREAM_NAMES: dict[int, str] = {STDOUT: "stdout", STDERR: "stderr"}
_QUEUE = 64  # items a stream's reader may run ahead of the socket
_EOF = object()
_HEADERS = object()  # the servicer accepted the call: the response starts


def _after(request: web.Request) -> int:
    """Where a watch resumes: ``Last-Event-ID`` (a reconnect) or ``?after=`` (default 0)."""
    text = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    name = "Last-Event-ID" if request.headers.get("Last-Event-ID") else "after"
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise InvalidArgumentError(
            [FieldViolation(name, f"is {text[:32]!r}; expected an event sequence number")]
        )
    return int(text)


def _log_position(request: web.Request) -> tuple[int, int, int]:
    """``(attempt, stdout_offset, stderr_offset)`` from ``Last-Event-ID`` or ``?attempt=``."""
    resume = request.headers.get("Last-Event-ID")
    if resume:
        parts = resume.split(":")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts):
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "Last-Event-ID", f"is {resume[:64]!r}; expected ATTEMPT:STDOUT:STDERR"
                    )
                ]
            )
        return int(parts[0]), int(parts[1]), int(parts[2])
    text = request.query.get("attempt") or "0"
    if not (text.isascii() and text.isdigit() and len(text) <= 7):
        raise InvalidArgumentError(
            [FieldViolation("attempt", f"is {text[:32]!r}; expected an attempt number")]
        )
    return int(text), 0, 0


class SseResponse:
    """One server-sent-events response, prepared when there is something to say (so that a
    refusal before then is an ordinary HTTP error with its status)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def open(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-store",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(self.request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            self.response = response
        return self.response

    async def send(self, event: str, data: Any, event_id: str | None = None) -> None:
        """One message; ``data`` as JSON on one line (JSON escapes every newline)."""
        response = await self.open()
        head = f"id: {event_id}\n" if event_id is not None else ""
        await response.write(f"{head}event: {event}\ndata: {convert.dumps(data)}\n\n".encode())

    async def comment(self) -> None:
        response = await self.open()
        await response.write(b": keepalive\n\n")


async def _pump(
    source: AsyncIterator[Any], queue: asyncio.Queue[Any], on_error: Callable[[Exception], None]
) -> None:
    """Reads ``source`` into ``queue`` (ends with ``_EOF``; an error first goes to
    ``on_error``). Runs as its own task, so that waiting on the queue with a timeout never
    cancels the stream being read."""
    try:
        async for item in source:
            await queue.put(item)
    except Exception as e:
        on_error(e)
    finally:
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]
        await queue.put(_EOF)


class UiStreams:
    """The SSE endpoints, over ``WorkflowService``'s streams."""

    def __init__(self, api: UiApi) -> None:
        self.api = api
        self.active: set[asyncio.Task[Any]] = set()  # cancelled when the UI stops

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/workflows/{workflow_id}/events", self.events),
            web.get("/api/workflows/{workflow_id}/actions/{action_id}/logs", self.logs),
        ]

    async def _serve(
        self,
        request: web.Request,
        call: HttpCall,
        source: AsyncIterator[Any],
        send: Callable[[Any], Any],
        *,
        open_at_once: bool = False,
    ) -> web.StreamResponse:
        """Streams what ``source`` yields through ``send`` with keep-alives. The response
        starts when the servicer sends its headers, its first item, or a keep-alive (or at
        once, with ``open_at_once``); an error before then is an HTTP error, after it an
        ``error`` message."""
        sse = SseResponse(request)
        if open_at_once:
            await sse.open()
        queue: asyncio.Queue[Any] = asyncio.Queue(_QUEUE)
        call.on_headers = lambda: queue.put_nowait(_HEADERS)
        failure: list[Exception] = []
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        reader = asyncio.create_task(_pump(source, queue, failure.append), name="plait-ui-sse")
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    await sse.comment()
                    continue
                if item is _EOF:
                    break
                if item is _HEADERS:
                    await sse.open()
                    continue
                await send((sse, item))
            if failure:
                err = failure[0]
                if not isinstance(err, PlaitError):
                    log.error("web UI stream %s failed", request.path, exc_info=err)
                    err = PlaitError("internal error; the coordinator's log has the details")
                if sse.response is None:
                    return json_response(error_body(err), http_status(err))
                await sse.send("error", error_body(err))
            return await sse.open()
        except ConnectionResetError:  # the browser went away: the stream just ends
            if sse.response is None:
                raise
            return sse.response
        finally:
            self.active.discard(task)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    # ---- workflow events ----------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The workflow's history after ``Last-Event-ID`` (or ``?after=``), then live events;
        ``end`` after the workflow's last event."""
        workflow_id = request.match_info["workflow_id"]
        after = _after(request)
        call, _ = self.api.call(request, "WorkflowService", "WatchWorkflow")
        stream = self.api.workflows.WatchWorkflow(
            wspb.WatchWorkflowRequest(workflow_id=workflow_id, after_sequence=after, follow=True),
            call,
        )

        async def send(item: tuple[SseResponse, wspb.WatchWorkflowResponse | None]) -> None:
            sse, resp = item
            if resp is None:  # a followed watch ends only after the workflow's last event
                await sse.send("end", {})
            elif resp.events:
                events = [convert.event(ev) for ev in resp.events]
                await sse.send("events", events, str(resp.events[-1].sequence))

        return await self._serve(request, call, _then_none(stream), send)

    # ---- action logs --------------------------------------------------------------------

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The action's output as it is written, attempt after attempt, until it ends."""
        workflow_id = request.match_info["workflow_id"]
        action_id = request.match_info["action_id"]
        attempt, out_offset, err_offset = _log_position(request)
        call, _ = self.api.call(request, "WorkflowService", "FollowActionLogs")
        follower = _follow(
            self.api,
            call,
            workflow_id,
            action_id,
            attempt,
            {STDOUT: out_offset, STDERR: err_offset},
        )

        async def send(item: tuple[SseResponse, tuple[str, dict[str, Any], str | None]]) -> None:
            sse, (event, data, event_id) = item
            await sse.send(event, data, event_id)

        # At once: the follower may wait long for an attempt to start, and says nothing
        # until then; a refusal (no such action) then arrives as an ``error`` message.
        return await self._serve(request, call, follower, send, open_at_once=True)


async def _then_none(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream, then None when it ended by itself; closed when the caller stops reading."""
    try:
        async for item in stream:
            yield item
        yield None
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _follow(
    api: UiApi,
    call: HttpCall,
    workflow_id: str,
    action_id: str,
    attempt: int,
    offsets: dict[int, int],
) -> AsyncIterator[tuple[str, dict[str, Any], str | None]]:
    """``(event, data, id)`` for each piece of output, each attempt's end, and the end."""
    while True:
        request = wspb.FollowActionLogsRequest(
            workflow_id=workflow_id,
            action_id=action_id,
            attempt=attempt,
            stdout_offset=offsets[STDOUT],
            stderr_offset=offsets[STDERR],
        )
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in offsets}
        last: wspb.FollowActionLogsResponse | None = None
        stream = api.workflows.FollowActionLogs(request, call)
        try:
            async for resp in stream:
                last = resp
                for chunk in resp.chunks:
                    stream_id = int(chunk.stream)
                    if stream_id not in offsets:
                        continue
                    gap = max(0, chunk.offset - offsets[stream_id])
                    offsets[stream_id] = chunk.offset + len(chunk.data)
                    text = decoders[stream_id].decode(chunk.data)
                    yield (
                        "log",
                        {
                            "attempt": resp.attempt,
                            "worker_id": resp.worker_id,
                            "stream": _STREAM_NAMES[stream_id],
                            "offset": chunk.offset,
                            "gap": gap,
                            "text": text,
                        },
                        f"{resp.attempt}:{offsets[STDOUT]}:{offsets[STDERR]}",
                    )
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if last is None or not last.ended:
            return  # the coordinator ended the stream (stopping): the browser reconnects
        state = last.action_state
        ended: dict[str, Any] = {
            "attempt": last.attempt,
            "worker_id": last.worker_id,
            "action_state": convert.ACTION_STATES.get(state, str(state)),
        }
        if last.HasField("tails"):
            ended["stdout_tail"] = last.tails.stdout_tail
            ended["stderr_tail"] = last.tails.stderr_tail
        yield "attempt_ended", ended, None
        if state in TERMINAL or last.attempt == 0:
            yield "end", {"action_state": ended["action_state"]}, None
            return
        attempt = last.attempt + 1
        offsets = {STDOUT: 0, STDERR: 0}
