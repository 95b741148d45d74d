"""Coordinator configuration (edge layer): one frozen dataclass, loaded in one place.

Precedence: command-line flags, then ``PLAIT_*`` environment variables, then a TOML file
(``--config``), then the defaults of RELIABILITY.md. Cross-field rules are checked by
:meth:`CoordinatorConfig.validate` at start-up; an unsafe configuration refuses to start.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import Any

from plait.coordinator.core.input_limits import LEASE_HEADROOM_BYTES, MAX_MESSAGE_BYTES, Limits
from plait.coordinator.journal.store import parse_store_url
from plait.durations import format_duration, parse_duration
from plait.errors import ConfigError
from plait.jsonlimits import MAX_OUTPUT_BYTES
from plait.security import is_loopback_host
from plait.sizes import parse_size

# Limits (and its sizes) is pure data the core reads: it lives in the core, re-exported here.
__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_METRICS_LISTEN",
    "LEASE_HEADROOM_BYTES",
    "LIMIT_FLAGS",
    "LOG_FORMATS",
    "MAX_JSON_DEPTH_CEILING",
    "MAX_MESSAGE_BYTES",
    "MAX_OUTPUT_CEILING",
    "CoordinatorConfig",
    "Limits",
    "build_parser",
    "env_var",
    "load_config",
    "parse_args",
    "split_host_port",
]

DEFAULT_LISTEN = "127.0.0.1:7450"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9450"
LOG_FORMATS = ("text", "json")  # --log-format (plait.logs)


# Help for the limit flags, in the order --help lists them (``--max-actions`` first).
LIMIT_FLAGS: dict[str, str] = {
    "max_actions": "largest workflow accepted, in actions (default 100000)",
    "max_spec_bytes": "a submitted spec's size; larger ones arrive in pieces (default 64MiB)",
    "max_edges": "needs-edges in one workflow (default 1000000)",
    "max_fan_in": "needs of one action (default 10000)",
    "max_depth": "actions on the longest needs-chain (default 10000)",
    "max_input_bytes": "ActionSpec.input_json size (default 1MiB)",
    "max_output_bytes": "an attempt's outputs_json size, at most 1MiB (default 1MiB)",
    "max_message_bytes": "largest gRPC message sent or received (default 4MiB)",
    "max_json_depth": "nesting of input, outputs and progress JSON, 1 to 512 (default 64)",
    "max_progress_bytes": "a progress report's details_json size (default 64KiB)",
    "max_tail_bytes": "stdout/stderr tail kept per attempt (default 64KiB)",
    "max_error_bytes": "an attempt's error (message and details) size (default 16KiB)",
    "max_argv": "exec argv entries (default 4096)",
    "max_argv_bytes": "exec argv size (default 256KiB)",
    "max_env": "env entries of one action (default 1024)",
    "max_env_bytes": "env size of one action (default 256KiB)",
    "max_labels": "entries of workflow labels, a selector, or a worker's labels (default 256)",
    "max_label_bytes": "size of one such map (default 64KiB)",
    "max_resources": "resources of one action or worker (default 256)",
    "max_semaphores": "semaphores of one action (default 256)",
    "max_lease_bytes": "a lease's inputs and spec; larger fails the action (default 3.75MiB)",
}
# The ceiling of max_json_depth: parsers recurse once per level (Python's limit is ~1000).
MAX_JSON_DEPTH_CEILING = 512
MAX_OUTPUT_CEILING = MAX_OUTPUT_BYTES  # workers cap outputs here too (SDK and workerd)


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything a coordinator needs to start. Durations are ``timedelta``."""

    listen: str = DEFAULT_LISTEN
    store: str = "sqlite:///plait.db"
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    heartbeat_interval: timedelta = timedelta(seconds=5)
    lease_ttl: timedelta = timedelta(seconds=30)
    kill_grace: timedelta = timedelta(seconds=10)
    max_clock_offset: timedelta = timedelta(milliseconds=500)
    lease_loss_budget: int = 3
    # Leases granted beyond a worker's free slots, at most (it asks for its own in Hello).
    max_prefetch: int = 32
    shutdown_grace: timedelta = timedelta(seconds=10)
    ready_file: str | None = None
    advertise: str | None = None  # address standbys name as the leader's (default: listen)
    retention: timedelta = timedelta(days=7)
    output_cache_bytes: int = 64 * 1024 * 1024  # large outputs read back from the journal
    tls_cert: str | None = None  # PEM certificate chain served on gRPC (and /metrics)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mTLS: every connection presents a cert from this CA
    auth_tokens: str | None = None  # hashed bearer-token file (reloaded on SIGHUP)
    reflection: bool = False  # gRPC server reflection (describes the API; role read)
    metrics_public: bool = False  # allow /metrics on a non-loopback address
    ui_listen: str | None = None  # the web UI's HOST:PORT (docs/ui.md); off by default
    # Plaintext grpc.health.v1 Check only, for probes without TLS (coordinator/health_port.py)
    health_listen: str | None = None
    limits: Limits = field(default_factory=Limits)

    @property
    def tls(self) -> bool:
        """The gRPC port serves TLS."""
        return self.tls_cert is not None

    @property
    def auth_enabled(self) -> bool:
        """Callers must authenticate (client certificates and/or bearer tokens)."""
        return self.tls_client_ca is not None or self.auth_tokens is not None

    def validate(self) -> None:
        """Refuses unsafe or inconsistent settings, naming the rule that failed."""
        hb, ttl = self.heartbeat_interval, self.lease_ttl
        if hb <= timedelta(0):
            raise ConfigError("heartbeat_interval must be > 0")
        if ttl < 5 * hb:
            raise ConfigError(
                f"lease_ttl ({format_duration(ttl)}) must be >= 5 x heartbeat_interval"
                f" ({format_duration(hb)}): a lease must survive several lost heartbeats"
            )
        if self.kill_grace <= timedelta(0) or self.kill_grace > ttl / 3:
            raise ConfigError(
                f"kill_grace ({format_duration(self.kill_grace)}) must be > 0 and <= lease_ttl / 3"
                f" ({format_duration(ttl / 3)}): self-fencing must finish before the lease expires"
            )
        if self.max_clock_offset <= timedelta(0):
            raise ConfigError("max_clock_offset must be > 0")
        if not 0 <= self.lease_loss_budget <= 100:
            raise ConfigError("lease_loss_budget must be between 0 and 100")
        if not 0 <= self.max_prefetch <= 10_000:
            raise ConfigError("max_prefetch must be between 0 and 10000 (0: no prefetch)")
        self._validate_security()
        try:
            parse_store_url(self.store)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.retention <= timedelta(0):
            raise ConfigError("retention must be > 0")
        if self.advertise is not None:
            split_host_port(self.advertise, "advertise")
        self._validate_limits()

    def _validate_limits(self) -> None:
        """Every limit at least 1; the JSON depth and output size within their ceilings."""
        lim = self.limits
        for f in fields(Limits):
            if getattr(lim, f.name) < 1:
                raise ConfigError(f"{f.name} must be >= 1 (--{f.name.replace('_', '-')})")
        if lim.max_json_depth > MAX_JSON_DEPTH_CEILING:
            raise ConfigError(
                f"max_json_depth ({lim.max_json_depth}) must be <= {MAX_JSON_DEPTH_CEILING}:"
                " JSON parsers recurse once per level"
            )
        if lim.max_lease_bytes > lim.max_message_bytes - LEASE_HEADROOM_BYTES:
            raise ConfigError(
                f"max_lease_bytes ({lim.max_lease_bytes}) must be <= max_message_bytes -"
                f" {LEASE_HEADROOM_BYTES} ({lim.max_message_bytes - LEASE_HEADROOM_BYTES}):"
                " a lease must fit one message to its worker"
            )
        if lim.max_output_bytes > MAX_OUTPUT_CEILING:
            raise ConfigError(
                f"max_output_bytes ({lim.max_output_bytes}) must be <= {MAX_OUTPUT_CEILING}:"
                " workers refuse larger outputs themselves"
            )

    def _missing_beyond_loopback(self) -> list[str]:
        """What a port listening beyond loopback lacks: TLS and/or authentication."""
        return [
            what
            for what, ok in (
                ("TLS (--tls-cert and --tls-key)", self.tls),
                ("authentication (--tls-client-ca and/or --auth-tokens)", self.auth_enabled),
            )
            if not ok
        ]

    def _validate_security(self) -> None:
        """Secure by default: beyond loopback only with TLS and authentication."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "tls_client_ca needs tls_cert and tls_key: client certificates are checked"
                " only over TLS"
            )
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r}: no such file")
        host, _ = split_host_port(self.listen, "listen")
        missing = self._missing_beyond_loopback()
        if not is_loopback_host(host) and missing:
            raise ConfigError(
                f"listen {self.listen!r} is not a loopback address: Plait listens beyond"
                f" this host only with {' and '.join(missing)}; see docs/security.md"
                " (`plait certs init` makes a CA and certificates)"
            )
        if self.ui_listen is not None:
            uhost, _ = split_host_port(self.ui_listen, "ui_listen")
            if not is_loopback_host(uhost) and missing:
                raise ConfigError(
                    f"ui_listen {self.ui_listen!r} is not a loopback address: the web UI is"
                    f" served beyond this host only with {' and '.join(missing)}, as the gRPC"
                    " API is; see docs/ui.md"
                )
        if self.health_listen is not None:
            split_host_port(self.health_listen, "health_listen")
        if self.metrics_listen is not None:
            mhost, _ = split_host_port(self.metrics_listen, "metrics_listen")
            if not is_loopback_host(mhost) and not self.metrics_public:
                raise ConfigError(
                    f"metrics_listen {self.metrics_listen!r} is not a loopback address: pass"
                    " --metrics-public to serve /metrics beyond this host (over TLS when"
                    " --tls-cert is given)"
                )


def split_host_port(addr: str, name: str = "address") -> tuple[str, int]:
    """Splits ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{name} {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


_DURATIONS = {
    "heartbeat_interval",
    "lease_ttl",
    "kill_grace",
    "max_clock_offset",
    "shutdown_grace",
    "retention",
}
_INTS = {"lease_loss_budget", "max_prefetch"}
_BOOLS = {"reflection", "metrics_public"}
# The server's own TLS files have their own variables: PLAIT_TLS_CERT/_KEY name a client's
# certificate (workerd, the CLI), and a coordinator started from an operator's shell must not
# serve the operator's client certificate.
_ENV_NAMES = {
    "tls_cert": "PLAIT_SERVER_TLS_CERT",
    "tls_key": "PLAIT_SERVER_TLS_KEY",
    "tls_client_ca": "PLAIT_SERVER_TLS_CLIENT_CA",
}


def env_var(name: str) -> str:
    """The environment variable of a config field (``PLAIT_`` + its name, but for TLS)."""
    return _ENV_NAMES.get(name, "PLAIT_" + name.upper())


_PATHS = {"tls_cert", "tls_key", "tls_client_ca", "auth_tokens"}
_LIMITS = {f.name for f in fields(Limits)}


def _coerce(name: str, value: Any, source: str) -> Any:
    try:
        if name in _DURATIONS:
            return parse_duration(value, field=name)
        if name.endswith("_bytes"):
            return parse_size(value, field=name)
        if name in _INTS or name in _LIMITS:
            return int(value)
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(f"{name}: expected true or false, got {value!r}")
            return text in {"1", "true", "yes", "on"}
        if name in _PATHS and str(value).strip() == "":
            return None
        if name in {"metrics_listen", "ui_listen", "health_listen"} and str(value).lower() in {
            "",
            "off",
            "none",
        }:
            return None
        return str(value)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    """The ``plait coordinator`` / ``plait-coordinator`` flags."""
    p = argparse.ArgumentParser(
        prog="plait coordinator",
        description="Run the Plait coordinator (gRPC on --listen, Prometheus on --metrics-listen).",
    )
    p.add_argument("--config", help="TOML file with the same keys (lowest precedence)")
    p.add_argument("--listen", help=f"gRPC HOST:PORT (default {DEFAULT_LISTEN})")
    p.add_argument("--store", help="journal: sqlite:///PATH (default sqlite:///plait.db)")
    p.add_argument(
        "--metrics-listen", help=f"Prometheus HOST:PORT or 'off' (default {DEFAULT_METRICS_LISTEN})"
    )
    p.add_argument(
        "--ui-listen",
        help="serve the web UI on HOST:PORT (HTTPS with --tls-cert; behind the API's"
        " authentication; docs/ui.md); default off",
    )
    p.add_argument(
        "--health-listen",
        help="also answer grpc.health.v1 Check, and nothing else, in plaintext on HOST:PORT,"
        " for probes that cannot do TLS (Kubernetes' grpc probes): service '' is SERVING on"
        " the leader only, 'liveness' while the process runs; no authentication; default off",
    )
    p.add_argument("--heartbeat-interval", help="worker heartbeat cadence (default 5s)")
    p.add_argument("--lease-ttl", help="lease lifetime after the last heartbeat (default 30s)")
    p.add_argument("--kill-grace", help="SIGTERM -> SIGKILL grace for workers (default 10s)")
    p.add_argument("--max-clock-offset", help="remote HLC lead that is still merged (500ms)")
    p.add_argument("--lease-loss-budget", help="lease losses an action may suffer (default 3)")
    p.add_argument(
        "--max-prefetch",
        help="leases a worker may be granted beyond its free slots, queued to start as slots"
        " free (default 32; 0: none)",
    )
    p.add_argument("--shutdown-grace", help="time to drain workers on SIGTERM (default 10s)")
    p.add_argument("--ready-file", help="write {grpc, metrics, ui, pid} JSON here once serving")
    p.add_argument(
        "--advertise", help="HOST:PORT standbys give clients for this leader (default: --listen)"
    )
    p.add_argument("--retention", help="keep finished workflows this long (default 7d)")
    p.add_argument(
        "--output-cache-bytes",
        help="memory for large outputs read back from the journal (default 64MiB)",
    )
    p.add_argument("--tls-cert", help="PEM certificate (chain) this coordinator serves")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        help="CA whose client certificates are required on every connection (mTLS; workers"
        " need it: WorkerService takes a worker's identity from its certificate)",
    )
    p.add_argument(
        "--auth-tokens", help="hashed bearer-token file (`plait tokens create`); SIGHUP reloads"
    )
    p.add_argument(
        "--reflection",
        action="store_const",
        const=True,
        default=None,
        help="serve gRPC server reflection (off by default; needs role read)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_const",
        const=True,
        default=None,
        help="allow --metrics-listen on a non-loopback address (TLS when --tls-cert is given)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    p.add_argument(
        "--log-format",
        default=os.environ.get("PLAIT_LOG_FORMAT") or "text",
        choices=LOG_FORMATS,
        help="text, or json: one object per line with ts, level, logger, message, trace_id,"
        " span_id, workflow_id, action_id, worker_id, lease_id (env PLAIT_LOG_FORMAT;"
        " default %(default)s)",
    )
    limits = p.add_argument_group(
        "input limits", "what clients and workers may send (sizes take 64KiB, 1MiB, ...)"
    )
    for name, text in LIMIT_FLAGS.items():
        limits.add_argument("--" + name.replace("_", "-"), help=text)
    return p


def load_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> CoordinatorConfig:
    """Merges flags, ``PLAIT_*`` environment and the TOML file into a validated config."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    names = [f.name for f in fields(CoordinatorConfig) if f.name != "limits"] + sorted(_LIMITS)

    def put(name: str, value: Any, source: str) -> None:
        target = limits if name in _LIMITS else values
        target[name] = _coerce(name, value, source)

    config_path = getattr(args, "config", None) or env.get("PLAIT_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {config_path}: {e}") from e
        section = table.get("coordinator", table)
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"config file {config_path}: unknown key {key!r}")
            put(name, value, f"{config_path}: {key}")
    for name in names:
        var = env_var(name)
        if var in env:
            put(name, env[var], var)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            put(name, value, "--" + name.replace("_", "-"))
    cfg = CoordinatorConfig(**values)
    if limits:
        cfg = replace(cfg, limits=replace(cfg.limits, **limits))
    cfg.validate()
    return cfg


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the daemon's command line."""
    return build_parser().parse_args(argv)
