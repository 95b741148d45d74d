"""Holds what tests/deploy_files.py finds in deploy/ to the programs it is handed to.

Each flag to the parser of its program — the daemons' own ``build_parser`` (what their
``--help`` prints and their ``main`` parses) or the ``plait`` CLI's, subcommand by subcommand —
and each ``PLAIT_*`` variable to the ones that program reads.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import cache
from typing import Any

from tests.deploy_files import CLI, COORDINATOR, ROOT, WORKERD, EnvSetting, Invocation

_PLAIT_VAR = re.compile(r"PLAIT_[A-Z0-9_]+")
_PLACEHOLDER = re.compile(r"[$%{]")  # $(VAR), ${VAR}, %d, {{ .Values }}: not literal values


# ----- what the programs accept -----------------------------------------------------------------


def parser_for(program: str) -> argparse.ArgumentParser:
    """The parser of ``program``: what its ``--help`` prints and its ``main`` parses."""
    if program == COORDINATOR:
        from plait.coordinator import config as coordinator_config

        return coordinator_config.build_parser()
    if program == WORKERD:
        from plait.workerd import config as workerd_config

        return workerd_config.build_parser({})
    from plait.cli import main as cli_main

    return cli_main.build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> Mapping[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def flag_problems(inv: Invocation) -> list[str]:
    """What in ``inv``'s argv its program would not accept: an unknown flag (prefixes, which
    argparse would accept, are refused too: spell flags out) or a value outside a flag's
    choices. For the CLI, the flags of every (sub)command on the way count."""
    parsers = [parser_for(inv.program)]
    if inv.program == CLI:
        for word in inv.argv:
            choices = _subcommands(parsers[-1])
            if word in choices:
                parsers.append(choices[word])
    options: dict[str, argparse.Action] = {}
    for parser in parsers:
        options.update(parser._option_string_actions)
    command = " ".join([inv.program, *[p.prog.split()[-1] for p in parsers[1:]]])
    problems = []
    for i, word in enumerate(inv.argv):
        if word == "--":
            break
        if not (word.startswith("--") or re.fullmatch(r"-[A-Za-z]", word)):
            continue
        name, eq, value = word.partition("=")
        action = options.get(name)
        if action is None:
            problems.append(f"{inv.where}: `{command}` has no flag {name}")
            continue
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            if not eq:
                value = inv.argv[i + 1] if i + 1 < len(inv.argv) else ""
            if not _PLACEHOLDER.search(value) and value not in action.choices:
                problems.append(
                    f"{inv.where}: `{command}` {name} {value!r}: not one of {list(action.choices)}"
                )
    return problems


def _plait_constants(source: str) -> set[str]:
    """Every string constant in Python ``source`` that is a whole ``PLAIT_*`` name."""
    return {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and _PLAIT_VAR.fullmatch(node.value)
    }


def _module_constants(*modules: Any) -> set[str]:
    out: set[str] = set()
    for module in modules:
        out |= _plait_constants(inspect.getsource(module))
    return out


@cache
def env_vars(program: str | None) -> frozenset[str]:
    """The ``PLAIT_*`` variables ``program`` reads; None: any part of Plait (the daemons, the
    CLI, the SDK, what actions are given).

    The coordinator's are its settings' (``config.env_var`` of every field and input limit,
    as ``load_config`` reads them) and the names its config and main modules read directly;
    workerd's are the names its config and main modules read and the ``PLAIT_TLS_*`` that
    ``plait.security.tls_from_env`` takes.
    """
    from plait import security
    from plait.coordinator import config as coordinator_config
    from plait.coordinator import main as coordinator_main
    from plait.workerd import config as workerd_config
    from plait.workerd import main as workerd_main

    if program == COORDINATOR:
        cfg = coordinator_config
        names = [f.name for f in fields(cfg.CoordinatorConfig) if f.name != "limits"]
        names += [f.name for f in fields(cfg.Limits)]
        return frozenset({cfg.env_var(n) for n in names} | _module_constants(cfg, coordinator_main))
    if program == WORKERD:
        return frozenset(
            _module_constants(workerd_config, workerd_main)
            | _plait_constants(inspect.getsource(security.tls_from_env))
        )
    everything: set[str] = set(env_vars(COORDINATOR) | env_vars(WORKERD))
    for top in (ROOT / "clients" / "python" / "plait", ROOT / "coordinator", ROOT / "workerd"):
        for path in top.rglob("*.py"):
            if "v1" not in path.relative_to(top).parts:
                everything |= _plait_constants(path.read_text())
    return frozenset(everything)


def env_problems(settings: Iterable[EnvSetting]) -> list[str]:
    """The settings whose variable their program does not read."""
    problems = []
    for s in settings:
        if s.name not in env_vars(s.program):
            who = s.program or "any part of Plait"
            problems.append(f"{s.where}: {s.name} is not read by {who}")
    return problems


def coordinator_setting_names() -> frozenset[str]:
    """The keys ``load_config`` takes from a TOML file."""
    from plait.coordinator import config as coordinator_config

    names = {f.name for f in fields(coordinator_config.CoordinatorConfig)} - {"limits"}
    names |= {f.name for f in fields(coordinator_config.Limits)}
    return frozenset(names)
