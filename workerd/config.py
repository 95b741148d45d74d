"""Workerd configuration: flags, then `PLAIT_*` environment, checked at start-up (workerd layer).

A bad value raises :class:`plait.errors.ConfigError` naming the flag; ``main`` turns it into a
message on stderr and exit status 2.

Credentials: TLS files from ``--tls-ca --tls-cert --tls-key --tls-server-name`` (else
``PLAIT_TLS_CA``/``_CERT``/``_KEY``/``_SERVER_NAME``), and a bearer token from the first line of
``--token-file`` (else ``$PLAIT_TOKEN``). Start-up refuses a certificate without its key, a
missing file, and a token bound for a non-loopback coordinator without TLS.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from plait import durations
from plait.durations import parse_duration
from plait.endpoints import parse_targets
from plait.errors import ConfigError
from plait.ids import describe_id
from plait.security import (
    TlsFiles,
    check_token_transport,
    identity_from_pem,
    is_loopback_host,
    tls_from_env,
)
from plait.worker.handlers import Worker
from plait.worker.resources import (
    RESOURCE_NAME_RE,
    detect_resources,
    merge_resources,
    parse_resource,
)
from plait.worker.serve import default_worker_id
from plait.workerd.rlimits import Rlimits, parse_rlimit_flags
from plait.workerd.runas import RunAs, parse_run_as
from plait.workerd.secrets import SecretStore

DEFAULT_COORDINATOR = "127.0.0.1:7450"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_./-]{0,62}[A-Za-z0-9])?")
_MAX_SLOTS = 65536


@dataclass(frozen=True, slots=True)
class WorkerdConfig:
    """Everything the daemon needs, checked once at start-up."""

    coordinator: str = DEFAULT_COORDINATOR
    worker_id: str = field(default_factory=default_worker_id)
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    prefetch: int = 32
    """``Hello.prefetch`` (``--prefetch``): leases queued beyond the free slots, in slots."""
    labels: Mapping[str, str] = field(default_factory=dict)
    handlers: tuple[str, ...] = ()
    exec_enabled: bool = True
    reconnect_initial: timedelta = timedelta(milliseconds=200)
    reconnect_max: timedelta = timedelta(seconds=10)
    log_level: str = "INFO"
    clock_offset_ms: int = 0
    resources: Mapping[str, float] = field(default_factory=detect_resources)
    """``Hello.resources``: detected ``cpu``/``memory_mb`` with ``--resource`` on top."""
    adaptive: bool = True
    """Withhold slots while the host is overloaded (``--adaptive/--no-adaptive``)."""
    tls: TlsFiles | None = None
    """TLS to the coordinator (``--tls-*``); ``None``: plaintext."""
    token: str = field(default="", repr=False)  # a secret: kept out of reprs and logs
    """Bearer token (``--token-file`` or ``$PLAIT_TOKEN``); empty: none."""
    secrets: SecretStore = field(default_factory=SecretStore)
    """Secrets exec actions may name (``--secret NAME=file:PATH|env:VAR``); repr: names only."""
    run_as: RunAs | None = None
    """``--run-as``: the identities exec actions run as; ``None``: workerd's own."""
    allow_root: bool = False
    """``--allow-root``: accept exec as root or as the coordinator's uid."""
    rlimits: Rlimits = field(default_factory=lambda: Rlimits.defaults(run_as=False))
    """Each attempt's limits and the most an action may ask for (``--rlimit``)."""
    cgroup: str = "auto"
    """``--cgroup``: ``auto``, ``off`` or a cgroup v2 directory to create attempt cgroups in."""
    tmp_root: str = ""
    """``--tmp-root``: where attempt directories live; empty: ``$TMPDIR``/``/var/tmp``
    ``/plait-<worker id>``."""
    log_format: str = "text"
    """``--log-format``: ``text`` or ``json`` (one object per line: :mod:`plait.logs`)."""
    metrics_listen: str | None = None
    """``--metrics-listen HOST:PORT``: serve Prometheus /metrics there; ``None``: off."""
    metrics_public: bool = False
    """``--metrics-public``: allow ``--metrics-listen`` on a non-loopback address."""

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the flag of the first bad value."""
        addresses = parse_coordinator(self.coordinator)
        check_token_transport(addresses, self.tls, self.token)
        if why := describe_id(self.worker_id):  # the coordinator's rule (plait.ids)
            raise ConfigError(f"--id: {self.worker_id!r}: {why}")
        if not 1 <= self.slots <= _MAX_SLOTS:
            raise ConfigError(f"--slots: must be between 1 and {_MAX_SLOTS}, got {self.slots}")
        if not 0 <= self.prefetch <= 10_000:
            raise ConfigError(f"--prefetch: must be between 0 and 10000, got {self.prefetch}")
        for key in self.labels:
            if not _LABEL_KEY.fullmatch(key):
                raise ConfigError(f"--label: bad key {key!r} (1 to 64 of [A-Za-z0-9_./-])")
        if self.reconnect_initial <= timedelta(0):
            raise ConfigError("--reconnect-backoff: the initial delay must be positive")
        if self.reconnect_max < self.reconnect_initial:
            raise ConfigError("--reconnect-backoff: the maximum is below the initial delay")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")
        for name, amount in self.resources.items():
            if not RESOURCE_NAME_RE.fullmatch(name):
                raise ConfigError(f"--resource: bad name {name!r}")
            if not 0 <= amount < float("inf"):
                raise ConfigError(f"--resource: {name} must be a finite number >= 0")
        if self.cgroup not in ("auto", "off") and not os.path.isabs(self.cgroup):
            raise ConfigError(
                f"--cgroup: {self.cgroup!r} must be auto, off or an absolute cgroup v2 directory"
            )
        self._check_observability()
        if not self.exec_enabled and not self.handlers:
            raise ConfigError("--no-exec: nothing left to serve; add --handlers or drop --no-exec")

    def _check_observability(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format: must be one of {', '.join(LOG_FORMATS)}")
        if self.metrics_listen is not None:
            host, _ = parse_metrics_listen(self.metrics_listen)
            if not is_loopback_host(host) and not self.metrics_public:
                raise ConfigError(
                    f"--metrics-listen {self.metrics_listen}: not a loopback address; /metrics"
                    " is served without TLS or authentication, so pass --metrics-public to"
                    " serve it beyond this host (and firewall it)"
                )


def parse_coordinator(text: str) -> tuple[str, ...]:
    """The coordinator addresses (``HOST:PORT``, comma-separated for several)."""
    return parse_targets(text, "--coordinator")


def parse_metrics_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-listen {text!r}: expected HOST:PORT such as 127.0.0.1:9464")
    return host, int(port)


def parse_clock_offset(text: str) -> int:
    """``PLAIT_CLOCK_OFFSET``: a signed duration (``1h``, ``-90s``) or milliseconds (``-1500``)."""
    try:
        return durations.parse_clock_offset(text)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def parse_backoff(text: str) -> tuple[timedelta, timedelta]:
    """``200ms:10s`` -> (initial, maximum)."""
    first, sep, second = text.partition(":")
    if not sep:
        raise ConfigError(
            f"--reconnect-backoff: expected INITIAL:MAX such as 200ms:10s, got {text!r}"
        )
    try:
        return (
            parse_duration(first, field="--reconnect-backoff"),
            parse_duration(second, field="--reconnect-backoff"),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def read_token_file(path: str) -> str:
    """The token on the first line of ``path`` (surrounding whitespace stripped)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError as err:
        raise ConfigError(f"--token-file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: not a text file") from None
    if not first:
        raise ConfigError(f"--token-file {path}: the first line is empty; expected the token")
    return first


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """``k=v`` items into a dict."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label: expected KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def parse_resources(items: Sequence[str]) -> dict[str, float]:
    """``NAME=N`` items into a dict (a later item wins)."""
    out: dict[str, float] = {}
    for item in items:
        try:
            name, amount = parse_resource(item)
        except ValueError as err:
            raise ConfigError(f"--resource: {err}") from None
        out[name] = amount
    return out


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``plait-workerd`` argument parser (defaults read from ``environ``)."""
    p = argparse.ArgumentParser(
        prog="plait-workerd",
        description="Plait worker daemon: runs exec actions and Python handlers leased by a"
        " coordinator.",
    )
    p.add_argument(
        "--coordinator",
        default=environ.get("PLAIT_COORDINATOR") or DEFAULT_COORDINATOR,
        metavar="HOST:PORT",
        help="coordinator gRPC address (env PLAIT_COORDINATOR; default %(default)s)",
    )
    p.add_argument(
        "--id",
        dest="worker_id",
        default=environ.get("PLAIT_WORKER_ID") or None,
        metavar="NAME",
        help="worker id, unique among connected workers (env PLAIT_WORKER_ID; default"
        " HOSTNAME-PID)",
    )
    p.add_argument("--slots", type=int, default=None, help="concurrent slots (default: CPU count)")
    p.add_argument(
        "--prefetch",
        type=int,
        default=32,
        help="slots' worth of leases to take beyond the free slots and queue, each started the"
        " moment a slot frees (the coordinator grants fewer for long actions and asks unstarted"
        " ones back for idle workers; default 32, 0: none)",
    )
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)"
    )
    p.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="SPEC",
        help="module:attr or path/to/file.py[:attr] naming a plait.Worker whose handlers to"
        " serve (attr defaults to 'worker'; repeatable)",
    )
    p.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a resource offered in Hello.resources, e.g. gpu=2; adds to or overrides the"
        " detected cpu and memory_mb (repeatable)",
    )
    p.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="withhold slots while the host is overloaded (load per CPU > 1.5, MemAvailable"
        " < 10%%, or memory PSI; default on)",
    )
    p.add_argument("--no-exec", action="store_true", help="do not run exec actions")
    p.add_argument(
        "--reconnect-backoff",
        default="200ms:10s",
        metavar="INITIAL:MAX",
        help="full-jitter reconnect backoff (default %(default)s)",
    )
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, help="DEBUG, INFO, WARNING or ERROR"
    )
    p.add_argument(
        "--log-format",
        default=environ.get("PLAIT_LOG_FORMAT") or "text",
        choices=LOG_FORMATS,
        help="text, or json: one object per line with ts, level, logger, message, trace_id,"
        " span_id, workflow_id, action_id, worker_id, lease_id (env PLAIT_LOG_FORMAT;"
        " default %(default)s)",
    )
    obs = p.add_argument_group("metrics")
    obs.add_argument(
        "--metrics-listen",
        default=environ.get("PLAIT_METRICS_LISTEN") or None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics on this address (env PLAIT_METRICS_LISTEN; default off)",
    )
    obs.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow --metrics-listen on a non-loopback address (plain HTTP, no authentication)",
    )
    p.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME=file:PATH|env:VAR",
        help="a secret exec actions may name (ActionSpec.secrets): read from PATH for every"
        " attempt, or taken from this process's $VAR at start-up (repeatable)",
    )
    sandbox = p.add_argument_group("exec sandbox")
    sandbox.add_argument(
        "--run-as",
        metavar="SPEC",
        help="run exec actions as this user: a name, UID, UID:GID, or a pool (comma list"
        " and/or range such as 62000-62007; each running attempt gets a uid of its own)",
    )
    sandbox.add_argument(
        "--allow-root",
        action="store_true",
        help="accept running exec actions as root or as the coordinator's uid (refused"
        " otherwise; for a local development cluster)",
    )
    sandbox.add_argument(
        "--rlimit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an attempt's limit, also the most an action may ask for: processes,"
        " address_space, file_size, open_files or cpu; a number, a size (2GiB), a duration"
        " (cpu) or 'unlimited' (repeatable)",
    )
    sandbox.add_argument(
        "--cgroup",
        default="auto",
        metavar="auto|off|PATH",
        help="a cgroup v2 cgroup per attempt: 'auto' where workerd may create them under its"
        " own, 'off', or a cgroup directory to create them under (default %(default)s)",
    )
    sandbox.add_argument(
        "--tmp-root",
        metavar="DIR",
        help="private directory for attempt directories (default $TMPDIR or /var/tmp, then"
        " plait-<worker id>)",
    )
    tls = p.add_argument_group("credentials")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA certificate that signed the coordinator's; turns TLS on (env PLAIT_TLS_CA)",
    )
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this worker's certificate, for mTLS; needs --tls-key (env PLAIT_TLS_CERT)",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert (env PLAIT_TLS_KEY)")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to check the coordinator's certificate against instead of the address's"
        " host (env PLAIT_TLS_SERVER_NAME)",
    )
    tls.add_argument(
        "--token-file",
        metavar="FILE",
        help="file whose first line is this worker's bearer token (default: $PLAIT_TOKEN);"
        " sent only over TLS or to a loopback coordinator",
    )
    return p


def config_from_args(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    detect: Callable[[], Mapping[str, float]] = detect_resources,
) -> WorkerdConfig:
    """Builds and validates the config from parsed flags and the environment.

    ``detect`` measures the host's resources (injectable for tests).
    """
    initial, maximum = parse_backoff(args.reconnect_backoff)
    run_as = parse_run_as(args.run_as) if args.run_as else None
    overrides = parse_resources(args.resource)
    # Flags first, then PLAIT_TLS_* (tls_from_env checks the files and the cert/key pairing).
    tls = tls_from_env(
        args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name, environ=environ
    )
    token = read_token_file(args.token_file) if args.token_file else environ.get("PLAIT_TOKEN", "")
    config = WorkerdConfig(
        coordinator=args.coordinator,
        worker_id=worker_id_for(args.worker_id, tls),
        slots=args.slots if args.slots is not None else (os.cpu_count() or 1),
        prefetch=args.prefetch,
        labels=parse_labels(args.label),
        handlers=tuple(args.handlers),
        exec_enabled=not args.no_exec,
        reconnect_initial=initial,
        reconnect_max=maximum,
        log_level=args.log_level,
        clock_offset_ms=parse_clock_offset(environ.get("PLAIT_CLOCK_OFFSET", "")),
        resources=merge_resources(detect(), overrides),
        adaptive=args.adaptive,
        tls=tls,
        token=token.strip(),
        secrets=SecretStore.from_flags(args.secret, environ),
        run_as=run_as,
        allow_root=args.allow_root,
        rlimits=parse_rlimit_flags(args.rlimit, run_as=run_as is not None),
        cgroup=args.cgroup.strip() or "auto",
        tmp_root=args.tmp_root or "",
        log_format=args.log_format,
        metrics_listen=_off_or(args.metrics_listen),
        metrics_public=args.metrics_public,
    )
    config.validate()
    return config


def _off_or(value: str | None) -> str | None:
    """``None`` for an absent, empty or ``off`` value."""
    if value is None or value.strip().lower() in ("", "off", "none"):
        return None
    return value.strip()


def worker_id_for(given: str | None, tls: TlsFiles | None) -> str:
    """The worker id: ``--id``, else the one the certificate names, else HOSTNAME-PID.

    With a worker certificate the coordinator accepts only the id it proves, so a different
    ``--id`` is refused here, at start-up, naming both.

    Raises:
        ConfigError: ``--id`` disagrees with the certificate, or the certificate is unreadable.
    """
    cert_id = ""
    if tls is not None and tls.cert is not None:
        try:
            ident = identity_from_pem(tls.read("cert"))
        except ValueError as e:
            raise ConfigError(f"--tls-cert {tls.cert}: not a PEM certificate ({e})") from None
        cert_id = ident.name if ident.kind == "worker" else ""
        if given and cert_id and given != cert_id:
            raise ConfigError(
                f"--id {given!r} does not match the worker id {cert_id!r} that --tls-cert"
                f" {tls.cert} proves; the coordinator would refuse it (drop --id, or use"
                f" the certificate of worker {given!r})"
            )
    return given or cert_id or default_worker_id()


def load_worker(spec: str) -> Worker:
    """Imports the :class:`plait.Worker` named by ``module:attr`` or ``file.py[:attr]``."""
    attr = "worker"
    try:
        if ".py" in spec:
            end = spec.rfind(".py") + 3
            path, rest = spec[:end], spec[end:]
            if rest:
                if not rest.startswith(":") or len(rest) < 2:
                    raise ConfigError(f"--handlers {spec}: expected path/to/file.py[:attr]")
                attr = rest[1:]
            file = Path(path).resolve()
            if not file.is_file():
                raise ConfigError(f"--handlers {spec}: no such file {path}")
            name = f"plait_handlers_{re.sub(r'[^A-Za-z0-9_]', '_', file.stem)}_{abs(hash(file))}"
            mod_spec = importlib.util.spec_from_file_location(name, file)
            if mod_spec is None or mod_spec.loader is None:
                raise ConfigError(f"--handlers {spec}: cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            # Let the file import its neighbours.
            sys.path.insert(0, str(file.parent))
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            mod_name, sep, attr_name = spec.partition(":")
            if sep:
                attr = attr_name
            module = importlib.import_module(mod_name)
        obj = getattr(module, attr, None)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"--handlers {spec}: import failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(obj, Worker):
        raise ConfigError(
            f"--handlers {spec}: {attr!r} is {type(obj).__name__}, not a plait.Worker"
        )
    return obj
