"""The ``plait`` commands that talk to a running coordinator (CLI layer).

Each ``cmd_*`` takes the parsed arguments and returns an exit code; errors propagate as
:mod:`plait.errors` exceptions and :mod:`plait.cli.main` turns them into exit codes. Every one
dials the coordinator through :func:`client_for`: ``--coordinator`` and the TLS flags
(``--tls-ca --tls-cert --tls-key --tls-server-name``, else ``PLAIT_TLS_*``), the token from
``$PLAIT_TOKEN``; what none of those give comes from the client config file's context
(:mod:`plait.cli.contexts`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.text import Text

from plait.cli import contexts, render
from plait.cli.flows import add_param_flags, load_flow
from plait.cli.follow import Follower, follow
from plait.cli.progress import RunProgress
from plait.cli.render import clean
from plait.client import Client, parse_action_state, parse_workflow_state
from plait.clock import SystemClock
from plait.durations import parse_duration
from plait.errors import FieldViolation, InvalidArgumentError
from plait.v1 import workflow_pb2

EXIT_OK, EXIT_FAILED = 0, 1

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


# Success, including success with failures a join tolerated.
SUCCESS_STATES = frozenset(
    {workflow_pb2.WORKFLOW_STATE_SUCCEEDED, workflow_pb2.WORKFLOW_STATE_PARTIALLY_SUCCEEDED}
)


# (flag, metavar, help) of the client's TLS flags; dest is the flag's name with underscores.
TLS_FLAGS = (
    ("--tls-ca", "FILE", "CA certificate that signed the coordinator's; turns TLS on"),
    ("--tls-cert", "FILE", "client certificate (mTLS); needs --tls-key"),
    ("--tls-key", "FILE", "the key of --tls-cert"),
    ("--tls-server-name", "NAME", "name to check the coordinator's certificate against"),
)


def add_tls_flags(p: argparse.ArgumentParser, dest_prefix: str = "") -> None:
    """Adds ``--tls-ca --tls-cert --tls-key --tls-server-name`` (dest ``tls_ca``... after
    ``dest_prefix``); unset, each falls back to its ``PLAIT_TLS_*`` variable."""
    for flag, metavar, help_text in TLS_FLAGS:
        env = "PLAIT_" + flag.removeprefix("--").replace("-", "_").upper()
        p.add_argument(
            flag,
            dest=dest_prefix + flag.removeprefix("--").replace("-", "_"),
            metavar=metavar,
            help=f"{help_text} (default: ${env}, else the context's)",
        )


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="coordinator address (default: $PLAIT_COORDINATOR, else the context's, else"
        " 127.0.0.1:7450)",
    )
    add_tls_flags(parent)
    add_context_flag(parent)
    return parent


def add_context_flag(p: argparse.ArgumentParser) -> None:
    """Adds ``--context NAME`` (a context of the client config file: plait.cli.contexts)."""
    p.add_argument(
        "--context",
        metavar="NAME",
        help="the client config file's context to use (default: $PLAIT_CONTEXT, else the"
        " file's current-context)",
    )


def client_for(args: argparse.Namespace) -> Client:
    """The :class:`Client` the parsed flags describe: each setting from its flag, else its
    ``PLAIT_*`` variable, else the context in use (:mod:`plait.cli.contexts`), else the
    default."""
    conn = contexts.connection(args)
    return Client(conn.target, tls=conn.tls, token=conn.token)


STATUS_LIMIT = 100
"""Actions ``plait status`` (and ``--wait``) shows in a table by default."""
RECONNECT_S = 60.0


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    return parse


_count = whole_number(0)


def _seconds(text: str) -> float:
    try:
        return parse_duration(text, field="--reconnect-timeout").total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reconnect_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reconnect-timeout",
        type=_seconds,
        default=RECONNECT_S,
        metavar="DURATION",
        help="when the coordinator is lost (a restart, a failover), keep trying this long and"
        f" resume after the last event seen (default {RECONNECT_S:g}s; 0: give up at once)",
    )


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )


def add_parsers(sub: _SubParsers) -> None:
    """Registers every client command."""
    parent = _client_parent()

    p = sub.add_parser("submit", parents=[parent], help="submit a workflow file")
    p.add_argument("flow", metavar="FLOW.yaml", help="the workflow file")
    add_param_flags(p)
    p.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting KEY returns the same workflow"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--wait", action="store_true", help="wait for the outcome (exit 0 only if it succeeded)"
    )
    mode.add_argument(
        "--watch",
        action="store_true",
        help="follow it until it finishes: live progress on a terminal (stuck actions with"
        " their reason), else one line per event",
    )
    _reconnect_flag(p)
    _output(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "status",
        parents=[parent],
        help="show a workflow and its actions",
        description="A workflow's summary (state, counts per state, times, duration) and its"
        " actions with their start and end times, durations and why they wait; the first"
        f" {STATUS_LIMIT} actions in a table unless --limit says otherwise.",
    )
    p.add_argument("workflow_id", metavar="ID", help="the workflow's id (as submit printed it)")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help="only actions in STATE (pending, ready, leased, running, succeeded, failed,"
        " cancelled, skipped, timed_out); repeat it or separate with commas for several",
    )
    p.add_argument(
        "--limit",
        type=_count,
        metavar="N",
        help=f"at most N actions, saying how many were left out (default: {STATUS_LIMIT} in a"
        " table, all with -o json; 0: all)",
    )
    _output(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", parents=[parent], help="list workflows, newest first")
    p.add_argument("--state", metavar="STATE", help="running, succeeded, failed or cancelled")
    _output(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("events", parents=[parent], help="a workflow's history, in HLC order")
    p.add_argument("workflow_id", metavar="ID", help="the workflow's id (as submit printed it)")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until it finishes")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="only events after SEQ")
    _reconnect_flag(p)
    _output(p)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "logs",
        parents=[parent],
        help="an action's stdout/stderr: the tails, or (-f) followed live",
        description="Print the stdout and stderr tails each attempt of an action reported; with"
        " -f, follow the running attempt's output as it is written (and each retry's) until the"
        " action ends, then exit 0.",
    )
    p.add_argument("workflow_id", metavar="ID", help="the workflow's id")
    p.add_argument("action_id", metavar="ACTION", help="the action's id")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream the output while the action runs (stdout to stdout, stderr to stderr);"
        " exit 0 when the action ends",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="print the tails exactly as the action wrote them, escape sequences included"
        " (by default control characters are shown escaped, e.g. \\x1b)",
    )
    _output(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", parents=[parent], help="cancel a workflow")
    p.add_argument("workflow_id", metavar="ID", help="the workflow's id (as submit printed it)")
    p.add_argument("--reason", default="", help="recorded in the history")
    _output(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "retry", parents=[parent], help="re-run the actions of a workflow that did not succeed"
    )
    p.add_argument("workflow_id", metavar="ID", help="the workflow's id (as submit printed it)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the outcome and print it (exit 0 only if it succeeded)",
    )
    _reconnect_flag(p)
    _output(p)
    p.set_defaults(func=cmd_retry)

    _add_worker_parsers(sub, parent)


def _add_worker_parsers(sub: _SubParsers, parent: argparse.ArgumentParser) -> None:
    """``workers``, ``drain``, ``revoke``, ``reinstate``."""
    p = sub.add_parser(
        "workers", parents=[parent], help="list connected workers and revoked worker ids"
    )
    _output(p)
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("drain", parents=[parent], help="ask a worker to finish its work and leave")
    p.add_argument(
        "worker_id", metavar="WORKER", help="the worker's id (as `plait workers` lists it)"
    )
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser(
        "revoke",
        parents=[parent],
        help="cut a worker off now and refuse its id until reinstated (role operate)",
        description="End the worker's stream, run its leases elsewhere, and refuse its id until"
        " `plait reinstate`; survives coordinator restarts and failovers.",
    )
    p.add_argument(
        "worker_id", metavar="WORKER", help="the worker's id (as `plait workers` lists it)"
    )
    p.add_argument("--reason", default="", help="why, for the record (at most 1 KiB)")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser(
        "reinstate", parents=[parent], help="accept a revoked worker id again (role operate)"
    )
    p.add_argument(
        "worker_id", metavar="WORKER", help="the worker's id (as `plait workers` lists it)"
    )
    p.set_defaults(func=cmd_reinstate)


def _outcome(status: workflow_pb2.WorkflowStatus) -> int:
    return EXIT_OK if status.state in SUCCESS_STATES else EXIT_FAILED


def _note(line: str) -> None:
    """One line for people on stderr (stdout stays the command's output)."""
    print(f"plait: {clean(line)}", file=sys.stderr, flush=True)


def _reconnect(args: argparse.Namespace) -> float | None:
    return float(args.reconnect_timeout) or None


def _matching(status: workflow_pb2.WorkflowStatus, states: frozenset[int]) -> int:
    """How many of the workflow's actions are in ``states`` (all of them when empty)."""
    counts = status.action_counts
    if not states:
        return sum(counts.values())
    names = {render.action_state(s).upper() for s in states}
    return sum(n for name, n in counts.items() if name.removeprefix("ACTION_STATE_") in names)


def _print_status(
    status: workflow_pb2.WorkflowStatus, states: frozenset[int] = frozenset()
) -> None:
    """The header, the actions table and, when some were left out, how many."""
    out = render.console()
    for line in render.workflow_header(status):
        out.print(Text(line))  # text, not markup: the lines hold other people's strings
    if status.actions:
        out.print()
        out.print(render.actions_table(status.actions))
    omitted = _matching(status, states) - len(status.actions)
    if omitted > 0:
        which = "" if not states else " " + "/".join(render.action_state(s) for s in sorted(states))
        out.print(
            Text(
                f"… {omitted} more{which} action(s) not shown (--limit N, 0 for all;"
                " --state STATE to choose)"
            )
        )


def _final_status(client: Client, workflow_id: str, output: str) -> workflow_pb2.WorkflowStatus:
    """The status to print at the end: every action for JSON, the first ones for a table."""
    return client.get(workflow_id, limit=None if output == "json" else STATUS_LIMIT)


def cmd_submit(args: argparse.Namespace) -> int:
    """``plait submit``."""
    spec = load_flow(args)
    with client_for(args) as client:
        resp = client.submit(spec, idempotency_key=args.idempotency_key)
        result: dict[str, Any] = {"workflow_id": resp.workflow_id, "created": resp.created}
        if args.output == "table":
            print(clean(resp.workflow_id), flush=True)
            if not resp.created:
                print("(an existing workflow: same idempotency key)", file=sys.stderr)
        if not (args.wait or args.watch):
            if args.output == "json":
                render.print_json(result)
            return EXIT_OK
        if args.watch and args.output == "table" and sys.stdout.isatty():
            _watch_live(client, spec, resp.workflow_id, _reconnect(args))
            status = _final_status(client, resp.workflow_id, args.output)
        elif args.watch:
            _stream_events(
                client,
                resp.workflow_id,
                0,
                follow=True,
                output=args.output,
                reconnect=_reconnect(args),
            )
            status = _final_status(client, resp.workflow_id, args.output)
        else:
            status = client.wait(resp.workflow_id, reconnect=_reconnect(args), on_reconnect=_note)
    if args.output == "json":
        result["workflow"] = render.status_dict(status)
        if args.watch:
            render.print_json_line(result)
        else:
            render.print_json(result)
    else:
        print()
        _print_status(status)
    return _outcome(status)


def _watch_live(
    client: Client, spec: workflow_pb2.WorkflowSpec, workflow_id: str, reconnect: float | None
) -> None:
    """``submit --watch`` on a terminal: the live progress view ``plait run`` shows."""
    progress = RunProgress(spec, workflow_id)
    try:
        follow(client, progress, Follower("live", SystemClock(), reconnect=reconnect))
    except KeyboardInterrupt:
        _note(
            f"stopped watching; {workflow_id} goes on (plait status {workflow_id},"
            f" plait cancel {workflow_id})"
        )
        raise


def cmd_status(args: argparse.Namespace) -> int:
    """``plait status``: a summary and the first ``--limit`` actions (``--state`` ones)."""
    try:
        states = frozenset(
            parse_action_state(name)
            for given in args.state
            for name in given.split(",")
            if name.strip()
        )
    except ValueError as exc:
        raise InvalidArgumentError([FieldViolation("--state", str(exc))]) from None
    limit = args.limit
    if limit is None:
        limit = 0 if args.output == "json" else STATUS_LIMIT
    with client_for(args) as client:
        status = client.get(args.workflow_id, states=states, limit=limit or None)
    if args.output == "json":
        doc = render.status_dict(status)
        doc["actions_omitted"] = max(0, _matching(status, states) - len(status.actions))
        render.print_json(doc)
    else:
        _print_status(status, states)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``plait list``."""
    try:
        state = parse_workflow_state(args.state)
    except ValueError as exc:
        raise InvalidArgumentError([FieldViolation("state", str(exc))]) from None
    with client_for(args) as client:
        workflows = client.list(state=state)
    if args.output == "json":
        render.print_json({"workflows": [render.to_dict(w) for w in workflows]})
    else:
        render.console().print(render.workflows_table(workflows))
    return EXIT_OK


def _stream_events(
    client: Client,
    workflow_id: str,
    after: int,
    *,
    follow: bool,
    output: str,
    reconnect: float | None = None,
) -> None:
    """Prints the history after ``after``, then (``follow``) live events to the stream's end:
    the coordinator ends it when the workflow finishes. A lost coordinator is waited for up
    to ``reconnect`` seconds, with one line on stderr, and the stream resumes after the last
    event printed."""
    if output == "table":
        print(render.EVENT_HEADER, flush=True)
    for event in client.watch(
        workflow_id,
        after_sequence=after,
        follow=follow,
        reconnect=reconnect if follow else None,
        on_reconnect=_note,
    ):
        if output == "json":
            render.print_json_line(render.to_dict(event))
        else:
            print(render.event_line(event), flush=True)


def cmd_events(args: argparse.Namespace) -> int:
    """``plait events``."""
    with client_for(args) as client:
        _stream_events(
            client,
            args.workflow_id,
            args.after,
            follow=args.follow,
            output=args.output,
            reconnect=_reconnect(args),
        )
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``plait logs`` (``-f``: :mod:`plait.cli.follow_logs`)."""
    if args.follow:
        from plait.cli.follow_logs import follow

        with client_for(args) as client:
            return follow(
                client, args.workflow_id, args.action_id, raw=args.raw, output=args.output
            )
    with client_for(args) as client:
        attempts = client.logs(args.workflow_id, args.action_id)
    if args.output == "json":
        render.print_json({"attempts": [render.to_dict(a) for a in attempts]})
    elif attempts and args.raw:
        # Exactly the bytes the action wrote: the point of --raw is to let them through.
        sys.stdout.buffer.write((render.logs_text(attempts, raw=True) + "\n").encode())
        sys.stdout.flush()
    elif attempts:
        print(render.logs_text(attempts))
    else:
        print(f"no logs recorded for {clean(args.action_id)} yet", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """``plait cancel``."""
    with client_for(args) as client:
        state = client.cancel(args.workflow_id, reason=args.reason)
    name = workflow_pb2.WorkflowState.Name(workflow_pb2.WorkflowState.ValueType(state))
    if args.output == "json":
        render.print_json({"workflow_id": args.workflow_id, "state": name})
    else:
        print(f"{clean(args.workflow_id)}: {render.short(name)}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """``plait retry``: keeps committed outputs, re-runs failed/skipped/cancelled actions;
    with ``--wait``, prints the outcome as ``submit --wait`` does."""
    with client_for(args) as client:
        ids = client.retry(args.workflow_id)
        result: dict[str, Any] = {"workflow_id": args.workflow_id, "retried": ids}
        if args.output == "table":
            print(
                f"{clean(args.workflow_id)}: re-running {len(ids)} action(s):"
                f" {clean(', '.join(ids))}",
                flush=True,
            )
        if not args.wait:
            if args.output == "json":
                render.print_json(result)
            return EXIT_OK
        status = client.wait(args.workflow_id, reconnect=_reconnect(args), on_reconnect=_note)
    if args.output == "json":
        result["workflow"] = render.status_dict(status)
        render.print_json(result)
    else:
        print()
        _print_status(status)
    return _outcome(status)


def cmd_workers(args: argparse.Namespace) -> int:
    """``plait workers``."""
    with client_for(args) as client:
        listing = client.list_workers()
    if args.output == "json":
        render.print_json(
            {
                "workers": [render.to_dict(w) for w in listing.workers],
                "revoked": [render.to_dict(r) for r in listing.revoked],
            }
        )
    else:
        out = render.console()
        out.print(render.workers_table(listing.workers, SystemClock().wall_ms()))
        if listing.revoked:
            out.print(render.revoked_table(listing.revoked))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    """``plait revoke``."""
    with client_for(args) as client:
        resp = client.revoke(args.worker_id, args.reason)
    state = "was connected, now cut off" if resp.was_connected else "not connected"
    print(
        f"{clean(args.worker_id)}: revoked ({state}; {resp.leases_requeued} lease(s) queued again)"
    )
    return EXIT_OK


def cmd_reinstate(args: argparse.Namespace) -> int:
    """``plait reinstate``."""
    with client_for(args) as client:
        was = client.reinstate(args.worker_id)
    print(f"{clean(args.worker_id)}: {'reinstated' if was else 'was not revoked'}")
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    """``plait drain``."""
    with client_for(args) as client:
        client.drain(args.worker_id)
    print(f"{clean(args.worker_id)}: draining")
    return EXIT_OK
