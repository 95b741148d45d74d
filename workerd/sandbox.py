"""The exec sandbox: argv templates, the scrubbed environment, the child's set-up (workerd layer).

Nothing from workerd's own environment reaches an action except ``PATH``: the child gets
``HOME`` and ``TMPDIR`` pointing at its own temp dir, ``LANG=C.UTF-8``, the spec's ``env``, and
the ``PLAIT_*`` variables below. The child runs in a new session (its own process group) and
asks the kernel for SIGKILL when workerd dies (``PR_SET_PDEATHSIG``, see :func:`pdeathsig_wrapper`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from plait.v1 import worker_service_pb2 as pb

_TEMPLATE = re.compile(r"\{\{\s*(input|item)((?:\.[A-Za-z0-9_-]+)*)\s*\}\}")

INPUTS_FILE_NAME = "plait-inputs.json"
OUTPUT_FILE_NAME = "plait-output.json"


class TemplateError(ValueError):
    """An argv template names a key the input (or item) does not have."""


class _Missing:
    """No item: the action is not a map child."""

    def __repr__(self) -> str:
        return "NO_ITEM"


NO_ITEM: Any = _Missing()


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def render_json(value: Any) -> str:
    """A template value as text: a string as it is, anything else as compact JSON."""
    return _render(value)


def expand_argv(argv: Sequence[str], static_input: Any, item: Any = NO_ITEM) -> list[str]:
    """Replaces ``{{ input.KEY }}`` and ``{{ item.KEY }}`` (dotted paths allowed).

    ``{{ input }}`` is the whole static input, ``{{ item }}`` a map child's whole item.
    Strings are inserted as they are; other JSON values as compact JSON.

    Raises:
        TemplateError: naming the argv item and the missing key (or the missing item).
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if "{{" not in arg:
            out.append(arg)
            continue

        def sub(m: re.Match[str], i: int = i) -> str:
            root = m.group(1)
            value = static_input if root == "input" else item
            if value is NO_ITEM:
                raise TemplateError(
                    f"exec.argv[{i}]: {m.group(0)}: the action has no item (not a map child)"
                )
            path = [p for p in m.group(2).split(".") if p]
            for depth, key in enumerate(path):
                if isinstance(value, dict) and key in value:
                    value = value[key]
                elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                    value = value[int(key)]
                else:
                    shown = f"{root}." + ".".join(path[: depth + 1])
                    raise TemplateError(f"exec.argv[{i}]: {m.group(0)}: the {root} has no {shown}")
            return _render(value)

        out.append(_TEMPLATE.sub(sub, arg))
    return out


def build_env(
    lease: pb.Lease,
    *,
    tmpdir: str,
    path: str,
    output_file: str,
    inputs_file: str,
    inputs_env: str,
    item_env: str | None = None,
) -> dict[str, str]:
    """The whole environment of an exec attempt (nothing is inherited).

    ``item_env`` is ``$PLAIT_ITEM`` (a map child's item as JSON); ``None`` leaves it unset.
    """
    env = {"PATH": path, "HOME": tmpdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8"}
    env.update(lease.action.env)
    env.update(
        {
            "PLAIT_WORKFLOW_ID": lease.workflow_id,
            "PLAIT_ACTION_ID": lease.action_id,
            "PLAIT_ATTEMPT": str(lease.attempt),
            "PLAIT_FENCING_TOKEN": str(lease.fencing_token),
            "PLAIT_IDEMPOTENCY_KEY": lease.idempotency_key,
            "PLAIT_LEASE_ID": lease.lease_id,
            "TRACEPARENT": lease.traceparent,
            "PLAIT_OUTPUT": output_file,
            "PLAIT_INPUTS": inputs_env,
            "PLAIT_INPUTS_FILE": inputs_file,
        }
    )
    if item_env is not None:
        env["PLAIT_ITEM"] = item_env
    return env


def env_without_nul(env: Mapping[str, str]) -> dict[str, str]:
    """Drops variables the kernel cannot carry (NUL bytes, '=' in names)."""
    return {k: v for k, v in env.items() if k and "=" not in k and "\0" not in k + v}


def pdeathsig_wrapper(path: str) -> tuple[str, ...]:
    """The argv prefix that sets ``PR_SET_PDEATHSIG=SIGKILL`` before exec'ing the action.

    util-linux's ``setpriv --pdeathsig KILL --`` does the prctl and execs the command, so the
    child needs no ``preexec_fn``: Python code between fork and exec is unsafe in a process
    with gRPC's threads (it crashed in testing) and forces fork() instead of vfork(). Returns
    ``()`` when setpriv is not installed; the keeper still kills every group if workerd dies.
    """
    found = shutil.which("setpriv", path=f"{path}:/usr/bin:/bin:/usr/sbin:/sbin")
    return (found, "--pdeathsig", "KILL", "--") if found else ()


def resolve_program(program: str, path: str, cwd: str | None = None) -> str | None:
    """``program`` as exec would find it on ``path`` (started in ``cwd``), or ``None``.

    A name with a slash is returned as given; a relative one must exist under ``cwd`` (by
    default, this process's working directory).
    """
    if "/" in program:
        return program if os.path.isfile(os.path.join(cwd or "", program)) else None
    return shutil.which(program, path=path)
