"""``plait validate FLOW.yaml``: every check a submission must pass, without a coordinator
(CLI layer).

The file is loaded as ``plait submit`` loads it (parameters applied), then checked by
:func:`plait.spec.validate.validate_submit` — the very function the coordinator runs on each
submission — against the default limits (:class:`plait.limits.Limits`). So cycles, duplicate
and unknown ids, join counts, map paths, sizes and counts are all found locally, each reported
on its own line starting with the file's name. Exit 0 with a one-line summary when the file is
valid, 2 when it is not.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from plait import submission
from plait.cli import render
from plait.cli.flows import add_param_flags, load_flow
from plait.errors import InvalidArgumentError
from plait.limits import Limits
from plait.spec import SpecError
from plait.spec.validate import longest_chain, validate_submit
from plait.v1 import workflow_pb2

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_parser", "check_spec", "cmd_validate", "summary"]

EXIT_OK, EXIT_USAGE = 0, 2
_ACTION_PATH = re.compile(r"actions\[(\d+)\](?:\.(.*))?")


def add_parser(sub: _SubParsers) -> None:
    """Registers ``plait validate``."""
    p = sub.add_parser(
        "validate",
        help="check a workflow file as the coordinator would, without one",
        description="Load FLOW (with its parameters) and run every check the coordinator runs"
        " on a submission, cycles included, against the default limits. Each problem is one"
        " line starting with the file's name; exit 0 with a one-line summary when FLOW is"
        " valid, 2 when it is not. Nothing is sent anywhere.",
    )
    p.add_argument("flow", metavar="FLOW.yaml", help="the workflow file")
    add_param_flags(p)
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="output format: a line for people, or a JSON document (errors included)",
    )
    p.set_defaults(func=cmd_validate)


def _where(field: str, spec: workflow_pb2.WorkflowSpec) -> str:
    """``spec.actions[3].needs[0]`` as the loader says it: ``actions[3] (id 'b'): needs[0]``."""
    path = field.removeprefix("spec.")
    m = _ACTION_PATH.fullmatch(path)
    if m is None:
        return path
    i = int(m.group(1))
    head = f"actions[{i}]"
    if i < len(spec.actions) and spec.actions[i].id:
        head += f" (id {spec.actions[i].id!r})"
    return f"{head}: {m.group(2)}" if m.group(2) else head


def check_spec(spec: workflow_pb2.WorkflowSpec, source: str, limits: Limits | None = None) -> None:
    """Runs the coordinator's checks on ``spec``, and the size checks ``plait submit`` makes
    before sending (the serialized spec against ``max_spec_bytes``, which the coordinator
    applies to the request, not in :func:`validate_submit`), with the same ``PLAIT_*`` limits.

    Raises:
        SpecError: every problem, each line naming ``source``, the action and the field.
    """
    violations = []
    try:
        submission.check_spec(spec, submission.SubmitLimits.from_env())
    except InvalidArgumentError as exc:
        violations.extend(exc.violations)
    reported = {v.field for v in violations}
    try:
        validate_submit(spec, "", limits or Limits())
    except InvalidArgumentError as exc:
        # The action count is checked by both: said once.
        violations.extend(v for v in exc.violations if v.field not in reported)
    if violations:
        problems = [
            (v, f"{_where(v.field, spec)}: {v.description}" if v.field else v.description)
            for v in violations
        ]
        raise SpecError(source, problems)


def summary(spec: workflow_pb2.WorkflowSpec) -> dict[str, Any]:
    """What a valid workflow holds: counts of actions, needs, maps and the longest chain."""
    needs = {a.id: list(a.needs) for a in spec.actions}
    return {
        "name": spec.name,
        "actions": len(spec.actions),
        "needs": sum(len(a.needs) for a in spec.actions),
        "fan_outs": sum(1 for a in spec.actions if a.HasField("map") or a.HasField("pipeline")),
        "longest_chain": longest_chain(list(needs), needs),
    }


def _errors(exc: SpecError) -> list[dict[str, str]]:
    return [
        {"field": v.field, "message": line}
        for v, line in zip(exc.violations, exc.lines, strict=True)
    ]


def cmd_validate(args: argparse.Namespace) -> int:
    """``plait validate``."""
    try:
        spec = load_flow(args)
        check_spec(spec, args.flow)
    except SpecError as exc:
        if args.output != "json":
            raise  # main prints each line and exits 2
        render.print_json({"file": args.flow, "valid": False, "errors": _errors(exc)})
        return EXIT_USAGE
    except InvalidArgumentError as exc:  # a bad -p, before the file was read
        if args.output != "json":
            raise
        errors = [{"field": v.field, "message": str(v)} for v in exc.violations]
        render.print_json({"file": args.flow, "valid": False, "errors": errors})
        return EXIT_USAGE
    facts = summary(spec)
    if args.output == "json":
        render.print_json({"file": args.flow, "valid": True, **facts})
        return EXIT_OK
    fan_outs = f", {facts['fan_outs']} map/pipeline" if facts["fan_outs"] else ""
    print(
        f"{render.clean(args.flow)}: valid: workflow {render.clean(spec.name)!r},"
        f" {facts['actions']} action(s), {facts['needs']} needs edge(s){fan_outs},"
        f" longest chain {facts['longest_chain']}"
    )
    return EXIT_OK
