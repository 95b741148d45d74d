"""The ``plait`` command (CLI layer): parses arguments, runs one command, maps errors to exits.

Exit codes: 0 ok; 1 the workflow failed (or was cancelled), or another error; 2 usage or
validation error (bad flags, a bad workflow file, an unknown id); 3 the coordinator is
unreachable; 130 interrupted. ``plait coordinator`` and ``plait workerd`` hand their arguments to
the daemons' own command lines unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from plait import __version__
from plait.errors import (
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    PlaitError,
    UnavailableError,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_DAEMONS = {
    "coordinator": "run the coordinator daemon (flags: plait coordinator --help)",
    "workerd": "run a worker daemon (flags: plait workerd --help)",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole ``plait`` argument parser."""
    from plait.cli import commands, completion, contexts, graph, run, secure, validate

    parser = argparse.ArgumentParser(
        prog="plait",
        description="Run DAGs of actions in parallel across many hosts.",
        epilog="exit codes: 0 ok, 1 workflow failed, 2 usage or validation error, "
        "3 coordinator unreachable. Environment: PLAIT_COORDINATOR, PLAIT_TOKEN, PLAIT_TLS_CA, "
        "PLAIT_TLS_CERT, PLAIT_TLS_KEY, PLAIT_TLS_SERVER_NAME, PLAIT_CONTEXT, "
        "PLAIT_CLIENT_CONFIG (flags win over the environment, which wins over the context).",
    )
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    # Also accepted before the command (`plait --coordinator a,b status ID`); a different dest,
    # because a subcommand's default would overwrite this one.
    parser.add_argument(
        "--coordinator",
        dest="global_coordinator",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="coordinator address(es), leader or standbys (default: $PLAIT_COORDINATOR, "
        "else the context's, else 127.0.0.1:7450)",
    )
    commands.add_tls_flags(parser, dest_prefix="global_")
    parser.add_argument(
        "--context",
        dest="global_context",
        metavar="NAME",
        help="the client config file's context to use (default: $PLAIT_CONTEXT, else the"
        " file's current-context; `plait config get-contexts` lists them)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.add_parser(sub)
    for name, help_text in _DAEMONS.items():
        # Listed for --help; main() hands their arguments over before argparse sees them.
        daemon = sub.add_parser(name, help=help_text, add_help=False)
        daemon.add_argument(
            "args", nargs=argparse.REMAINDER, help=f"the daemon's own flags (plait {name} --help)"
        )
    commands.add_parsers(sub)
    validate.add_parser(sub)
    graph.add_parser(sub)
    secure.add_parsers(sub)
    contexts.add_parsers(sub)
    completion.add_parser(sub)
    describe_subcommands(parser)
    return parser


def describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Gives every subcommand's ``--help`` a description: its one-line help, where it has no
    longer one of its own (argparse shows the help only in the parent's list)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            if not child.description and helps.get(name):
                text = str(helps[name])
                child.description = text[0].upper() + text[1:] + "."
            describe_subcommands(child)


# Flags accepted before the command as well as after it (dest "global_<name>" before).
_GLOBAL_FLAGS = ("coordinator", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "context")


def _fail(message: str, code: int) -> int:
    from plait.cli.render import clean

    # Messages quote what the coordinator, a worker or a file said: escape it for the terminal.
    print(f"plait: error: {clean(message, multiline=True)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plait`` console script; returns the exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] in _DAEMONS:
        from plait.cli import local

        if args_in[0] == "coordinator":
            return local.run_coordinator_main(args_in[1:])
        return local.run_workerd_main(args_in[1:])
    args = build_parser().parse_args(args_in)  # exits 2 on bad usage
    for name in _GLOBAL_FLAGS:
        # A flag given after the command wins over the same flag given before it.
        if getattr(args, name, None) is None and getattr(args, "global_" + name) is not None:
            setattr(args, name, getattr(args, "global_" + name))
    try:
        code: int = args.func(args)
    except (InvalidArgumentError, ConfigError) as exc:  # a bad workflow file, a bad address
        return _fail(exc.message, EXIT_USAGE)
    except NotFoundError as exc:
        return _fail(exc.message, EXIT_USAGE)
    except UnavailableError as exc:
        return _fail(exc.message, EXIT_UNAVAILABLE)
    except TimeoutError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except PlaitError as exc:
        return _fail(f"{exc.code.name}: {exc.message}", EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `plait events ID | head`: the reader left; not an error.
        sys.stderr.close()
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
