"""``plait run FLOW.yaml``: the embedded default (CLI layer).

Loads the flow (a bad file exits 2 before anything starts), brings up a :class:`LocalCluster`,
submits, follows the workflow's events with live progress (plain lines when stdout is not a
terminal, nothing but the final JSON with ``-o json``), prints a summary, stops the cluster, and
exits 0 only if the workflow succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import RenderableType
from rich.live import Live
from rich.text import Text

from plait.cli import render
from plait.cli.local import DEFAULT_STORE, LocalCluster, LocalClusterConfig, sqlite_path
from plait.cli.progress import RunProgress, live_view
from plait.client import Client
from plait.clock import Clock, SystemClock
from plait.errors import PlaitError
from plait.spec import load_workflow
from plait.v1 import workflow_pb2

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_INTERRUPTED = 130
_POLL_S = 0.25


# Success, including success with failures a join tolerated.
SUCCESS_STATES = frozenset(
    {workflow_pb2.WORKFLOW_STATE_SUCCEEDED, workflow_pb2.WORKFLOW_STATE_PARTIALLY_SUCCEEDED}
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``plait run``."""
    p = sub.add_parser(
        "run",
        help="run a workflow on an embedded coordinator and local workers",
        description="Start a coordinator (SQLite) and N local workerd processes, run FLOW with "
        "live progress, print a summary and stop everything. Exit 0 only if FLOW succeeded.",
    )
    p.add_argument("flow", metavar="FLOW.yaml", help="the workflow file")
    p.add_argument(
        "--workers", type=_positive, default=2, metavar="N", help="workerd processes (default 2)"
    )
    p.add_argument(
        "--slots",
        type=_positive,
        metavar="N",
        help="slots per worker (default: workerd's, its CPU count)",
    )
    p.add_argument(
        "--handlers",
        action="extend",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="handler modules each worker serves, passed on to workerd --handlers"
        " (e.g. examples.handlers:worker)",
    )
    p.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="URL",
        help=f"journal store (default {DEFAULT_STORE})",
    )
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    p.set_defaults(func=cmd_run)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _log_dir(store: str) -> Path:
    path = sqlite_path(store)
    return (path.parent if path is not None else Path(".plait")) / "logs"


def _configure_logging(log_dir: Path) -> None:
    # The coordinator runs in this process; its logs go to a file so the terminal stays readable.
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def cmd_run(args: argparse.Namespace, clock: Clock | None = None) -> int:
    """``plait run``; returns the exit code."""
    clock = clock or SystemClock()
    spec = load_workflow(args.flow)
    log_dir = _log_dir(args.store)
    _configure_logging(log_dir)
    config = LocalClusterConfig(
        store=args.store,
        workers=args.workers,
        slots=args.slots,
        handlers=tuple(args.handlers),
        log_dir=log_dir,
    )
    cluster = LocalCluster(config, clock)
    out = render.console()
    err = render.console(sys.stderr)
    try:
        try:
            target = cluster.start()
        except RuntimeError as exc:
            raise PlaitError(str(exc)) from exc
        # The embedded coordinator is plaintext on loopback, whatever PLAIT_TLS_* say.
        with Client(target, clock=clock, tls=False, token="") as client:
            submitted = client.submit(spec)
            progress = RunProgress(spec, submitted.workflow_id)
            interrupted = _follow(client, cluster, progress, args.output, clock)
            status = client.get(submitted.workflow_id)
    finally:
        cluster.stop()
    if args.output == "json":
        render.print_json(render.to_dict(status))
    else:
        exec_ids = frozenset(a.id for a in spec.actions if a.WhichOneof("kind") == "exec")
        out.print()
        out.print(render.actions_table(status.actions, progress.durations(), exec_ids=exec_ids))
        out.print()
        for line in render.workflow_header(status):
            out.print(Text(line))  # text, not markup: the lines hold other people's strings
        if status.state not in SUCCESS_STATES:
            err.print(Text(f"logs: {render.clean(str(log_dir))}/"))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if status.state in SUCCESS_STATES else EXIT_FAILED


def _follow(
    client: Client, cluster: LocalCluster, progress: RunProgress, output: str, clock: Clock
) -> bool:
    """Follows events until the workflow ends; returns True if the user interrupted."""
    events: queue.Queue[workflow_pb2.HistoryEvent | BaseException | None] = queue.Queue()
    lock = threading.Lock()

    def pump() -> None:
        try:
            for event in client.watch(progress.workflow_id):
                events.put(event)
            events.put(None)
        except BaseException as exc:  # handed to the main thread
            events.put(exc)

    threading.Thread(target=pump, name="plait-watch", daemon=True).start()
    tty = sys.stdout.isatty() and output != "json"
    plain = not tty and output != "json"

    def view() -> RenderableType:
        with lock:
            return live_view(progress, clock.wall_ms())

    live = (
        Live(get_renderable=view, console=render.console(), refresh_per_second=8) if tty else None
    )
    try:
        if live is not None:
            live.start()
        _drain(events, progress, lock, cluster, say=print if plain else None)
    except KeyboardInterrupt:
        if live is not None:
            live.stop()
        print("interrupted: cancelling the workflow", file=sys.stderr)
        try:
            client.cancel(progress.workflow_id, reason="interrupted (plait run)")
        except PlaitError as exc:
            print(f"plait: could not cancel: {render.clean(str(exc))}", file=sys.stderr)
        return True
    except PlaitError:
        # Leave nothing running in the store for the next `plait run` to pick up.
        with contextlib.suppress(PlaitError):
            client.cancel(progress.workflow_id, reason="plait run could not finish it")
        raise
    finally:
        if live is not None:
            live.stop()
    return False


def _drain(
    events: queue.Queue[workflow_pb2.HistoryEvent | BaseException | None],
    progress: RunProgress,
    lock: threading.Lock,
    cluster: LocalCluster,
    *,
    say: Callable[..., object] | None,
) -> None:
    while not progress.done:
        try:
            item = events.get(timeout=_POLL_S)
        except queue.Empty:
            _check_cluster(cluster, progress)
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        with lock:
            line = progress.apply(item)
        if say is not None and line:
            say(line)
            sys.stdout.flush()


def _check_cluster(cluster: LocalCluster, progress: RunProgress) -> None:
    """A run with every worker gone (or no coordinator) would wait forever: fail it instead."""
    if not cluster.coordinator_alive():
        raise PlaitError("the embedded coordinator stopped; see the logs")
    exited = cluster.exited_workers()
    if exited and len(exited) == len(cluster.workers):
        worker_id, code, path = exited[0]
        tail = _tail(path)
        raise PlaitError(
            f"every workerd exited (e.g. {worker_id} with code {code}); workflow"
            f" {progress.workflow_id} cannot finish. Last lines of {path}:\n{tail}"
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
