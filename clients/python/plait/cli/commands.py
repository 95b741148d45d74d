"""The ``plait`` commands that talk to a running coordinator (CLI layer).

Each ``cmd_*`` takes the parsed arguments and returns an exit code; errors propagate as
:mod:`plait.errors` exceptions and :mod:`plait.cli.main` turns them into exit codes. Every one
dials the coordinator through :func:`client_for`: ``--coordinator`` and the TLS flags
(``--tls-ca --tls-cert --tls-key --tls-server-name``, else ``PLAIT_TLS_*``), the token from
``$PLAIT_TOKEN``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from rich.text import Text

from plait.cli import render
from plait.cli.render import clean
from plait.client import Client, parse_workflow_state
from plait.errors import FieldViolation, InvalidArgumentError
from plait.security import tls_from_env
from plait.spec import load_workflow
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
            help=f"{help_text} (default: ${env})",
        )


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="coordinator address (default: $PLAIT_COORDINATOR, else 127.0.0.1:7450)",
    )
    add_tls_flags(parent)
    return parent


def client_for(args: argparse.Namespace) -> Client:
    """The :class:`Client` the parsed flags describe (flags, then ``PLAIT_*`` environment)."""
    tls = tls_from_env(
        getattr(args, "tls_ca", None),
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_server_name", None),
    )
    return Client(args.coordinator, tls=tls)


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )


def add_parsers(sub: _SubParsers) -> None:
    """Registers every client command."""
    parent = _client_parent()

    p = sub.add_parser("submit", parents=[parent], help="submit a workflow file")
    p.add_argument("flow", metavar="FLOW.yaml")
    p.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting KEY returns the same workflow"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--wait", action="store_true", help="wait for the outcome (exit 0 only if it succeeded)"
    )
    mode.add_argument("--watch", action="store_true", help="stream events until it finishes")
    _output(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[parent], help="show a workflow and its actions")
    p.add_argument("workflow_id", metavar="ID")
    _output(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", parents=[parent], help="list workflows, newest first")
    p.add_argument("--state", metavar="STATE", help="running, succeeded, failed or cancelled")
    _output(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("events", parents=[parent], help="a workflow's history, in HLC order")
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until it finishes")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="only events after SEQ")
    _output(p)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("logs", parents=[parent], help="an action's stdout/stderr tails")
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("action_id", metavar="ACTION")
    p.add_argument(
        "--raw",
        action="store_true",
        help="print the tails exactly as the action wrote them, escape sequences included"
        " (by default control characters are shown escaped, e.g. \\x1b)",
    )
    _output(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", parents=[parent], help="cancel a workflow")
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded in the history")
    _output(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "retry", parents=[parent], help="re-run the actions of a workflow that did not succeed"
    )
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("--wait", action="store_true", help="wait for the outcome (exit code)")
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
    p.add_argument("worker_id", metavar="WORKER")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser(
        "revoke",
        parents=[parent],
        help="cut a worker off now and refuse its id until reinstated (role operate)",
        description="End the worker's stream, run its leases elsewhere, and refuse its id until"
        " `plait reinstate`; survives coordinator restarts and failovers.",
    )
    p.add_argument("worker_id", metavar="WORKER")
    p.add_argument("--reason", default="", help="why, for the record (at most 1 KiB)")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser(
        "reinstate", parents=[parent], help="accept a revoked worker id again (role operate)"
    )
    p.add_argument("worker_id", metavar="WORKER")
    p.set_defaults(func=cmd_reinstate)


def _outcome(status: workflow_pb2.WorkflowStatus) -> int:
    return EXIT_OK if status.state in SUCCESS_STATES else EXIT_FAILED


def _print_status(status: workflow_pb2.WorkflowStatus) -> None:
    out = render.console()
    for line in render.workflow_header(status):
        out.print(Text(line))  # text, not markup: the lines hold other people's strings
    if status.actions:
        out.print()
        out.print(render.actions_table(status.actions))


def cmd_submit(args: argparse.Namespace) -> int:
    """``plait submit``."""
    spec = load_workflow(args.flow)
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
        if args.watch:
            _stream_events(client, resp.workflow_id, 0, follow=True, output=args.output)
            status = client.get(resp.workflow_id)
        else:
            status = client.wait(resp.workflow_id)
    if args.output == "json":
        result["workflow"] = render.to_dict(status)
        if args.watch:
            render.print_json_line(result)
        else:
            render.print_json(result)
    else:
        print()
        _print_status(status)
    return _outcome(status)


def cmd_status(args: argparse.Namespace) -> int:
    """``plait status``."""
    with client_for(args) as client:
        status = client.get(args.workflow_id)
    if args.output == "json":
        render.print_json(render.to_dict(status))
    else:
        _print_status(status)
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
    client: Client, workflow_id: str, after: int, *, follow: bool, output: str
) -> None:
    if output == "table":
        print(render.EVENT_HEADER, flush=True)
    for event in client.watch(workflow_id, after_sequence=after, follow=follow):
        if output == "json":
            render.print_json_line(render.to_dict(event))
        else:
            print(render.event_line(event), flush=True)
        if follow and event.type == workflow_pb2.EVENT_TYPE_WORKFLOW_FINISHED:
            return


def cmd_events(args: argparse.Namespace) -> int:
    """``plait events``."""
    with client_for(args) as client:
        _stream_events(client, args.workflow_id, args.after, follow=args.follow, output=args.output)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``plait logs``."""
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
    """``plait retry``: keeps committed outputs, re-runs failed/skipped/cancelled actions."""
    with client_for(args) as client:
        ids = client.retry(args.workflow_id)
        if args.output == "json":
            render.print_json({"workflow_id": args.workflow_id, "retried": ids})
        else:
            print(
                f"{clean(args.workflow_id)}: re-running {len(ids)} action(s):"
                f" {clean(', '.join(ids))}"
            )
        if not args.wait:
            return EXIT_OK
        status = client.wait(args.workflow_id)
    return EXIT_OK if status.state in SUCCESS_STATES else EXIT_FAILED


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
        out.print(render.workers_table(listing.workers))
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
