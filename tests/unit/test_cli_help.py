"""Every ``plait`` subcommand has a description and every argument a help text.

The test walks the whole parser (``plait certs init`` included) and lists what lacks one, so
a new flag without help fails here instead of showing a bare name in ``--help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from plait.cli.main import build_parser

_NO_HELP_NEEDED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """``(path, parser, one-line help)`` of every subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield (*path, name), child, helps.get(name)
                yield from subcommands(child, (*path, name))


def test_every_subcommand_has_a_help_line_and_a_description() -> None:
    found = list(subcommands(build_parser()))
    assert len(found) > 25  # the walk reaches nested commands too
    assert ("certs", "init") in [p for p, _, _ in found]
    missing = [
        " ".join(path)
        for path, child, help_line in found
        if not (help_line or "").strip() or not (child.description or "").strip()
    ]
    assert missing == []


def test_every_argument_has_help() -> None:
    parser = build_parser()
    missing = []
    for path, child in [((), parser)] + [(p, c) for p, c, _ in subcommands(parser)]:
        for action in child._actions:
            if isinstance(action, _NO_HELP_NEEDED):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                missing.append(f"plait {' '.join(path)}: {name}".replace("  ", " "))
    assert missing == []


def test_every_help_page_renders_with_its_description() -> None:
    for path, child, _ in subcommands(build_parser()):
        text = child.format_help()
        first = " ".join((child.description or "").split()[:3])
        assert first and first in " ".join(text.split()), path
