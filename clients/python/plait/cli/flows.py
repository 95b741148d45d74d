"""Workflow files on the command line, with their parameters (CLI layer).

``plait submit``, ``run``, ``validate`` and ``graph`` read ``FLOW.yaml`` the same way: values
for the parameters it declares come from ``--input-file FILE`` (a YAML or JSON mapping) and
``-p NAME=VALUE`` (repeatable; wins over the file), and are applied by the loader
(:mod:`plait.spec.params`) before anything is sent.
"""

from __future__ import annotations

import argparse
from typing import Any

from plait.errors import FieldViolation, InvalidArgumentError
from plait.spec import load_workflow
from plait.spec.files import load_params_file
from plait.spec.params import parse_assignment
from plait.v1 import workflow_pb2

__all__ = ["add_param_flags", "load_flow", "param_values"]


def add_param_flags(p: argparse.ArgumentParser) -> None:
    """Adds ``-p/--param NAME=VALUE`` and ``--input-file FILE``."""
    p.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a value for a parameter the workflow declares (repeatable; read as the"
        " parameter's type; wins over --input-file)",
    )
    p.add_argument(
        "--input-file",
        metavar="FILE",
        help="parameter values from a YAML or JSON file (a mapping of names to values)",
    )


def param_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The parameter values the flags give, and where each came from (for errors).

    Raises:
        InvalidArgumentError: a ``-p`` without ``NAME=``, naming it; or an unreadable file.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = getattr(args, "input_file", None)
    if path:
        for name, value in load_params_file(path).items():
            values[name] = value
            sources[name] = f"--input-file {path}: {name}"
    for text in getattr(args, "params", None) or ():
        try:
            name, value = parse_assignment(text)
        except ValueError as exc:
            raise InvalidArgumentError([FieldViolation("-p", str(exc))]) from None
        values[name] = value
        sources[name] = f"-p {name}"
    return values, sources


def load_flow(args: argparse.Namespace) -> workflow_pb2.WorkflowSpec:
    """``args.flow`` loaded with the parameters the flags give."""
    values, sources = param_values(args)
    return load_workflow(args.flow, params=values, param_sources=sources)
