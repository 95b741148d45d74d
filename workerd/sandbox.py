"""The exec sandbox: argv templates, the scrubbed environment, the child's set-up (workerd layer).

Nothing from workerd's own environment reaches an action except ``PATH``: the child gets
``HOME`` and ``TMPDIR`` pointing at its own temp dir, ``LANG=C.UTF-8``, the spec's ``env``, and
the ``PLAIT_*`` variables below. The child runs in a new session (its own process group) and
asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``): it is started by the
spawner (:mod:`plait.workerd.spawner`), or, when that is unavailable, through util-linux
``setpriv`` (:func:`find_setpriv`). That fallback — the chain of start steps, the start barrier
and the loader variables kept from them — is :func:`start_argv`, used by
:mod:`plait.workerd.attempt_process`.
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


def find_setpriv(path: str) -> str | None:
    """util-linux ``setpriv`` on ``path`` (and the usual system directories), or None.

    ``setpriv`` does the prctls and the user switch and execs the command, so the child needs
    no ``preexec_fn``: Python code between fork and exec is unsafe in a process with gRPC's
    threads (it crashed in testing), and so is any ``fork()`` there — ``subprocess`` only uses
    ``vfork()`` when it switches no user itself.
    """
    return shutil.which("setpriv", path=f"{path}:/usr/bin:/bin:/usr/sbin:/sbin")


# Variables that change how a dynamically linked program or a shell starts: glibc's list of
# variables it ignores in privileged (AT_SECURE) programs, the loader and malloc families, and
# the shells' start-up hooks. The sandbox's own start steps (setpriv, still root when it
# switches to the --run-as user; prlimit; the barrier shell) run before the attempt's user,
# limits and cgroup are all in place, so they must never see these: an LD_PRELOAD'ed library
# would run as root there. Such variables travel under another name and are restored by the
# barrier shell, just before it execs the action. Locale variables count only when their value
# is a path (glibc then loads locale data or message catalogs from it).
_DEFERRED = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "IFS",
        "PS4",
        "CDPATH",
        "PWD",  # the shell sets it; the action gets exactly the spec's (or none)
    }
)
_DEFERRED_PREFIXES = ("LD_", "MALLOC_", "BASH_FUNC_")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFERRED_PREFIX = "PLAIT_SANDBOX_DEFERRED_"
# The start barrier: the attempt's first process waits here (reading one line of stdin) while
# workerd moves it into its cgroup, then execs the action. It also restores deferred variables.
BARRIER = 'read -r _ || exit 125; unset PWD; exec "$@"'
BARRIER_NAME = "plait-sandbox"


_LOCALE = ("LANG", "LANGUAGE", "LC_")


def deferred_variable(name: str, value: str = "") -> bool:
    """Whether ``name=value`` may change how the sandbox's start steps run (see ``_DEFERRED``)."""
    if name in _DEFERRED or name.startswith(_DEFERRED_PREFIXES):
        return True
    return "/" in value and (name in _LOCALE[:2] or name.startswith(_LOCALE[2]))


def barrier_script(env: Mapping[str, str]) -> tuple[Mapping[str, str], str]:
    """(environment for the start steps, barrier script) for an attempt's final ``env``.

    The common case (no deferred variable) returns ``env`` itself and :data:`BARRIER`. A
    deferred variable whose name is not a shell name (``BASH_FUNC_f%%``) cannot be restored by
    the shell and is dropped.
    """
    moved = [k for k, v in env.items() if deferred_variable(k, v)]
    if not moved:
        return env, BARRIER
    out = {k: v for k, v in env.items() if k not in moved}
    steps = ["read -r _ || exit 125; unset PWD"]
    for name in moved:
        if _SHELL_NAME.fullmatch(name):
            carrier = DEFERRED_PREFIX + name
            out[carrier] = env[name]
            steps.append(f'export {name}="${carrier}"; unset {carrier}')
    steps.append('exec "$@"')
    return out, "; ".join(steps)


def start_argv(
    prefix: Sequence[str],
    program: str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    barrier: bool,
) -> tuple[list[str], Mapping[str, str], bool]:
    """(argv, env, whether the barrier is in it) that start an attempt: ``prefix`` (setpriv,
    prlimit), then the action.

    With ``barrier`` (a cgroup to join) — or when ``env`` holds a deferred variable — the
    barrier shell comes between them, and waits for a go line on stdin. ``program`` must be a
    path (see :func:`resolve_program`).
    """
    start_env, script = barrier_script(env)
    if not barrier and script == BARRIER:
        return [*prefix, program, *args], env, False
    return [*prefix, "/bin/sh", "-c", script, BARRIER_NAME, program, *args], start_env, True


def resolve_program(program: str, path: str, cwd: str | None = None) -> str | None:
    """``program`` as exec would find it on ``path`` (started in ``cwd``), or ``None``.

    A name with a slash is returned as given; a relative one must exist under ``cwd`` (by
    default, this process's working directory).
    """
    if "/" in program:
        return program if os.path.isfile(os.path.join(cwd or "", program)) else None
    return shutil.which(program, path=path)
