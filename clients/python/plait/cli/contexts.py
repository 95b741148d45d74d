"""The client's config file and its contexts; ``plait config ...`` (CLI layer).

A context names one coordinator (or a leader and its standbys) and how to reach it: TLS files
and a bearer token. The file is TOML, ``$PLAIT_CLIENT_CONFIG`` or else
``$XDG_CONFIG_HOME/plait/config.toml`` (``~/.config/plait/config.toml``)::

    current-context = "prod"

    [contexts.local]
    coordinator = "127.0.0.1:7450"

    [contexts.prod]
    coordinator = "10.0.0.1:7450,10.0.0.2:7450"
    tls-ca = "pki/ca.crt"            # relative paths are relative to this file's directory
    tls-cert = "pki/alice.crt"
    tls-key = "pki/alice.key"
    token-file = "prod.token"        # or token = "..." (then the file must be mode 0600)

The context in use is ``--context NAME``, else ``$PLAIT_CONTEXT``, else ``current-context``.
Each setting is taken from the first of: the command's flag, the ``PLAIT_*`` variable, the
context, the default. A token may sit in the file only if nobody but its owner can read it;
a token file likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from plait.cli import render
from plait.endpoints import ENV_VAR as COORDINATOR_ENV
from plait.endpoints import parse_targets
from plait.errors import ConfigError
from plait.security import TlsFiles, tls_from_env

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "CONFIG_ENV",
    "CONTEXT_ENV",
    "CONTEXT_KEYS",
    "ClientConfig",
    "Connection",
    "Context",
    "add_parsers",
    "config_path",
    "connection",
    "load_config",
]

CONFIG_ENV = "PLAIT_CLIENT_CONFIG"  # PLAIT_CONFIG is the coordinator's own TOML file
CONTEXT_ENV = "PLAIT_CONTEXT"
TOKEN_ENV = "PLAIT_TOKEN"
CONTEXT_KEYS = ("coordinator", "tls-ca", "tls-cert", "tls-key", "tls-server-name", "token")
_FILE_KEYS = ("tls-ca", "tls-cert", "tls-key", "token-file")  # paths, relative to the file
_ALL_KEYS = (*CONTEXT_KEYS, "token-file")
_CURRENT_LINE = re.compile(r"\s*current-context\s*=")
_MAX_TOKEN_BYTES = 64 * 1024
EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True, slots=True)
class Context:
    """One named context: where the coordinator is and how to reach it (unset: not given)."""

    name: str
    coordinator: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None
    token_file: str | None = None

    def read_token(self) -> str:
        """The context's token (from ``token``, else ``token-file``), or ``""``.

        Raises:
            ConfigError: the token file is missing, empty, or readable by others.
        """
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return ""
        path = self.token_file
        try:
            _check_private(path, "this token file is")
            with open(path, "rb") as f:
                token = f.read(_MAX_TOKEN_BYTES + 1).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"context {self.name!r}: token-file {path}: {why}") from None
        if not token or len(token) > _MAX_TOKEN_BYTES:
            raise ConfigError(
                f"context {self.name!r}: token-file {path}: expected one token of at most"
                f" {_MAX_TOKEN_BYTES} bytes"
            )
        return token


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A parsed config file: its contexts and its ``current-context``."""

    path: Path
    current: str | None = None
    contexts: dict[str, Context] = field(default_factory=dict)

    def context(self, name: str, source: str) -> Context:
        """The context called ``name``; ``source`` says who asked for it, for the error."""
        found = self.contexts.get(name)
        if found is None:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ConfigError(
                f"{source}: no context {name!r} in {self.path} (its contexts: {known})"
            )
        return found


@dataclass(frozen=True, slots=True)
class Connection:
    """What a client command dials: addresses (``None``: the default), TLS, token."""

    target: str | None
    tls: TlsFiles | Literal[False]
    token: str
    context: str | None = None


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$PLAIT_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/plait/config.toml``, else
    ``~/.config/plait/config.toml``."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "plait" / "config.toml"


def _check_private(path: str | Path, what: str) -> None:
    """Refuses a secret-holding file that its group or others may read or write; ``what``
    says what the file is (``this token file is``)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: {what} readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )


def _context(name: str, table: Any, path: Path) -> Context:
    where = f"{path}: contexts.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of {', '.join(_ALL_KEYS)}")
    values: dict[str, str] = {}
    for key, value in table.items():
        if key not in _ALL_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(_ALL_KEYS)}")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{key}: expected a non-empty string")
        # Paths are relative to the file's directory (an absolute one stays as it is).
        resolved = str(path.parent / Path(value).expanduser()) if key in _FILE_KEYS else value
        values[key.replace("-", "_")] = resolved
    if "token" in values and "token_file" in values:
        raise ConfigError(f"{where}: give token or token-file, not both")
    if "coordinator" in values:
        values["coordinator"] = ",".join(
            parse_targets(values["coordinator"], f"{where}.coordinator")
        )
    return Context(name, **values)


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> ClientConfig | None:
    """The config file, or None when there is none (a ``$PLAIT_CLIENT_CONFIG`` that names a
    missing file is an error, the default location is not).

    Raises:
        ConfigError: the file is not valid TOML or holds an unknown key, or it holds a token
            and others may read it; each message names the file.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or bool(env.get(CONFIG_ENV))
    path = path or config_path(env)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such client config file") from None
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for key in doc:
        if key not in ("current-context", "contexts"):
            raise ConfigError(
                f"{path}: unknown key {key!r}; allowed: current-context, [contexts.NAME]"
            )
    current = doc.get("current-context")
    if current is not None and not isinstance(current, str):
        raise ConfigError(f"{path}: current-context: expected a context name")
    tables = doc.get("contexts", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: contexts: expected tables [contexts.NAME]")
    contexts = {name: _context(name, table, path) for name, table in tables.items()}
    if any(c.token is not None for c in contexts.values()):
        _check_private(path, "this config file holds a token but is")
    return ClientConfig(path, current or None, contexts)


def selected_context(flag: str | None, environ: Mapping[str, str] | None = None) -> Context | None:
    """The context in use: ``--context``, else ``$PLAIT_CONTEXT``, else the file's
    ``current-context``; None when none is chosen (or there is no file)."""
    env = os.environ if environ is None else environ
    config = load_config(environ=env)
    if flag:
        source, name = "--context", flag
    elif env.get(CONTEXT_ENV):
        source, name = CONTEXT_ENV, env[CONTEXT_ENV]
    elif config is not None and config.current:
        source, name = f"{config.path}: current-context", config.current
    else:
        return None
    if config is None:
        raise ConfigError(f"{source}: context {name!r}, but there is no {config_path(env)}")
    return config.context(name, source)


def connection(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Connection:
    """Where and how a client command connects: each setting from its flag, else its
    ``PLAIT_*`` variable, else the context in use, else the default."""
    env = os.environ if environ is None else environ
    ctx = selected_context(getattr(args, "context", None), env)
    c = ctx or Context("")
    target: str | None = getattr(args, "coordinator", None)
    if not target and not env.get(COORDINATOR_ENV, "").strip():
        target = c.coordinator  # else the client reads $PLAIT_COORDINATOR, or its default
    files = {}
    for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
        variable = "PLAIT_" + name.upper()
        files[name] = getattr(args, name, None) or env.get(variable) or getattr(c, name)
    tls = tls_from_env(
        files["tls_ca"], files["tls_cert"], files["tls_key"], files["tls_server_name"], {}
    )
    token = env.get(TOKEN_ENV) or c.read_token()
    return Connection(
        target, tls if tls is not None else False, token, ctx.name if ctx is not None else None
    )


# plait config ----------------------------------------------------------------------------------


def add_parsers(sub: _SubParsers) -> None:
    """Registers ``plait config get-contexts|current-context|use-context``."""
    config = sub.add_parser(
        "config",
        help="list and choose the contexts of the client config file",
        description="Contexts name coordinators and how to reach them (addresses, TLS files, a"
        f" token); they live in ${CONFIG_ENV}, else ~/.config/plait/config.toml. Choose one"
        f" with --context NAME, ${CONTEXT_ENV} or `plait config use-context NAME`.",
    )
    csub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = csub.add_parser(
        "get-contexts",
        help="list the contexts, the one in use marked *",
        description="List every context of the config file: its name, coordinator(s), whether"
        " it uses TLS, and where its token comes from; the context in use is marked *.",
    )
    p.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    p.set_defaults(func=cmd_get_contexts)
    p = csub.add_parser(
        "current-context",
        help="print the name of the context in use",
        description="Print the context in use (--context, else $PLAIT_CONTEXT, else the file's"
        " current-context); exit 1 when none is.",
    )
    p.set_defaults(func=cmd_current_context)
    p = csub.add_parser(
        "use-context",
        help="make a context the file's current-context",
        description="Write `current-context = NAME` into the config file (which must define"
        " NAME), keeping the rest of the file as it is.",
    )
    p.add_argument("name", metavar="NAME", help="a context the config file defines")
    p.set_defaults(func=cmd_use_context)


def _required_config() -> ClientConfig:
    config = load_config()
    if config is None:
        raise ConfigError(
            f"no client config file at {config_path()} (set ${CONFIG_ENV} to use another);"
            " docs/cli.md shows its format"
        )
    return config


def _in_use(args: argparse.Namespace, config: ClientConfig) -> tuple[str | None, str]:
    """The name of the context in use and what chose it."""
    if getattr(args, "context", None):
        return args.context, "--context"
    if os.environ.get(CONTEXT_ENV):
        return os.environ[CONTEXT_ENV], CONTEXT_ENV
    return config.current, f"{config.path}: current-context"


def cmd_get_contexts(args: argparse.Namespace) -> int:
    """``plait config get-contexts``."""
    config = _required_config()
    current, _ = _in_use(args, config)
    rows: list[dict[str, Any]] = [
        {
            "name": c.name,
            "current": c.name == current,
            "coordinator": c.coordinator or "",
            "tls": c.tls_ca is not None,
            "token": "token" if c.token else "token-file" if c.token_file else "",
        }
        for c in config.contexts.values()
    ]
    if args.output == "json":
        render.print_json({"config": str(config.path), "contexts": rows})
        return EXIT_OK
    table = [("", "NAME", "COORDINATOR", "TLS", "TOKEN")] + [
        (
            "*" if r["current"] else "",
            r["name"],
            r["coordinator"] or "(default)",
            "yes" if r["tls"] else "no",
            r["token"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        cells = [f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)]
        print(render.clean("  ".join([*cells, row[4]]).rstrip()))
    return EXIT_OK


def cmd_current_context(args: argparse.Namespace) -> int:
    """``plait config current-context``."""
    config = _required_config()
    name, source = _in_use(args, config)
    if name is None:
        print("plait: no context in use (plait config use-context NAME)", file=sys.stderr)
        return EXIT_FAILED
    config.context(name, source)
    print(render.clean(name))
    return EXIT_OK


def cmd_use_context(args: argparse.Namespace) -> int:
    """``plait config use-context NAME``: rewrites the one ``current-context`` line."""
    config = _required_config()
    config.context(args.name, "use-context")
    path = config.path
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    line = f"current-context = {json.dumps(args.name)}\n"
    for i, text in enumerate(lines):
        if text.lstrip().startswith("["):
            lines.insert(i, line)  # top-level keys come before the first table
            break
        if _CURRENT_LINE.match(text):
            lines[i] = line
            break
    else:
        lines.append(line)
    new = "".join(lines)
    tomllib.loads(new)  # what is written must read back
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".toml")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"current context: {render.clean(args.name)} ({render.clean(str(path))})")
    return EXIT_OK
