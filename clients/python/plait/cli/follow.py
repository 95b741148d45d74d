"""Following one workflow with live progress: ``plait run`` and ``plait submit --watch`` (CLI
layer).

A thread reads the watch stream into a queue (the stream may block for as long as nothing
happens); the main thread folds each event into a :class:`~plait.cli.progress.RunProgress` and
shows it: a rich live view on a terminal, plain lines otherwise, nothing with ``quiet`` (JSON
output). While actions wait longer than the progress's ``stuck_after_ms`` the main thread asks
the coordinator why, every :data:`REASON_POLL_S` at most, with a GetWorkflow of the ready
actions only, so a workflow of any size costs one small call.

A lost coordinator is ridden out by the watch itself (:meth:`plait.Client.watch`,
``reconnect``): the follower prints one line when that starts and carries on after the last
event it saw.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rich.console import RenderableType
from rich.live import Live
from rich.text import Text

from plait.cli import render
from plait.cli.progress import RunProgress, live_view
from plait.client import Client
from plait.clock import Clock
from plait.errors import PlaitError
from plait.v1 import workflow_pb2

__all__ = ["REASON_POLL_S", "FollowMode", "Follower", "follow"]

FollowMode = Literal["live", "lines", "quiet"]
REASON_POLL_S = 2.0
_POLL_S = 0.25
# Ready actions whose reasons one poll asks for: the view shows a handful.
_REASONS_LIMIT = 50

_Item = workflow_pb2.HistoryEvent | BaseException | None


@dataclass
class Follower:
    """How :func:`follow` shows a workflow and what it checks between events.

    ``check`` runs whenever no event came for a moment (``plait run`` checks that its cluster is
    still alive there and raises if not). ``reconnect``: seconds the watch keeps trying to get
    a lost coordinator back (``None``: it fails at once, as a single unary call would).
    """

    mode: FollowMode
    clock: Clock
    reconnect: float | None = None
    check: Callable[[], None] | None = None


def follow(client: Client, progress: RunProgress, how: Follower) -> None:
    """Follows ``progress.workflow_id`` until it ends (or the stream does).

    Raises whatever the watch raised (:class:`plait.errors.PlaitError`) and
    ``KeyboardInterrupt``; the caller decides what an interruption means.
    """
    events: queue.Queue[_Item] = queue.Queue()
    lock = threading.Lock()
    live: Live | None = None

    def note(line: str) -> None:
        text = f"plait: {render.clean(line)}"
        if live is not None:
            live.console.print(Text(text, style="yellow"))
        else:
            print(text, file=sys.stderr, flush=True)

    def pump() -> None:
        try:
            for event in client.watch(
                progress.workflow_id, reconnect=how.reconnect, on_reconnect=note
            ):
                events.put(event)
            events.put(None)
        except BaseException as exc:  # handed to the main thread
            events.put(exc)

    def view() -> RenderableType:
        with lock:
            return live_view(progress, how.clock.wall_ms())

    threading.Thread(target=pump, name="plait-watch", daemon=True).start()
    if how.mode == "live":
        live = Live(get_renderable=view, console=render.console(), refresh_per_second=8)
    try:
        if live is not None:
            live.start()
        _drain(client, events, progress, lock, how)
    finally:
        if live is not None:
            live.stop()


def _drain(
    client: Client,
    events: queue.Queue[_Item],
    progress: RunProgress,
    lock: threading.Lock,
    how: Follower,
) -> None:
    polled_at: float | None = None
    while not progress.done:
        try:
            item = events.get(timeout=_POLL_S)
        except queue.Empty:
            if how.check is not None:
                how.check()
            now = how.clock.monotonic()
            due = polled_at is None or now - polled_at >= REASON_POLL_S
            if due and _ask_why(client, progress, lock, how):
                polled_at = now
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        with lock:
            line = progress.apply(item)
        if how.mode == "lines" and line:
            print(line, flush=True)


def _ask_why(client: Client, progress: RunProgress, lock: threading.Lock, how: Follower) -> bool:
    """Fetches the reasons of waiting actions when some are stuck; True if it asked."""
    now_ms = how.clock.wall_ms()
    with lock:
        stuck = progress.stuck(now_ms)
    if not stuck or how.mode == "quiet":
        return False
    try:
        status = client.get(progress.workflow_id, states=["ready"], limit=_REASONS_LIMIT)
    except PlaitError:
        return True  # the watch reports a lost coordinator; the view just goes without
    with lock:
        progress.set_reasons({a.action_id: a.reason for a in status.actions if a.reason})
        lines = progress.stuck_lines(now_ms) if how.mode == "lines" else []
    for line in lines:
        print(line, flush=True)
    return True
