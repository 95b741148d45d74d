"""Identities, roles, tokens and TLS material (foundation layer, shared by both sides).

One place for every convention the coordinator and its peers must agree on:

* **Roles.** ``read`` (inspect workflows and workers), ``submit`` (submit workflows),
  ``operate`` (cancel, retry, drain) and ``worker`` (serve a ``WorkerService.Connect``
  stream). ``operate`` implies ``submit`` and ``read``; ``submit`` implies ``read``; ``worker``
  implies nothing else (a worker cannot read other workflows).
* **Certificates.** A certificate names one identity with a URI subject alternative name
  ``plait://<kind>/<name>``, where kind is ``worker``, ``user`` or ``coordinator``; the roles it
  grants are its subject's ``OU`` values (one role per OU). A worker certificate
  (``plait://worker/w1``, ``OU=worker``) lets only worker ``w1`` connect. A coordinator's
  certificate carries ``plait://coordinator/<name>`` and ``OU=coordinator``, which is how a
  client tells a coordinator from any other certificate the same CA signed.
* **Bearer tokens.** ``plait_`` + 43 URL-safe characters (256 random bits). The coordinator's
  token file stores only ``sha256`` hex digests, with a name and roles per token (TOML,
  ``[[tokens]]`` tables; see :func:`load_token_file`). A worker token's name is the worker id it
  may use.
* **Transport.** TLS files for peers (``--tls-ca --tls-cert --tls-key``, or
  ``PLAIT_TLS_CA``/``PLAIT_TLS_CERT``/``PLAIT_TLS_KEY``), and the rule that a bearer token is
  never sent over a channel that is neither TLS nor loopback.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from plait.errors import ConfigError
from plait.ids import describe_id

__all__ = [
    "IDENTITY_SCHEME",
    "ROLE_IMPLIES",
    "TOKEN_PREFIX",
    "CertIdentity",
    "Role",
    "TlsFiles",
    "TokenEntry",
    "bearer_metadata",
    "channel_credentials",
    "check_token_transport",
    "effective_roles",
    "hash_token",
    "host_of",
    "identity_from_pem",
    "identity_uri",
    "is_loopback_host",
    "load_token_file",
    "new_token",
    "parse_roles",
    "tls_from_env",
    "token_file_text",
]

IDENTITY_SCHEME = "plait"
TOKEN_PREFIX = "plait_"
COORDINATOR_OU = "coordinator"
_TOKEN_RE = re.compile(r"plait_[A-Za-z0-9_-]{43}")


class Role(enum.StrEnum):
    """What a principal may do; every RPC needs exactly one (see the coordinator's table)."""

    READ = "read"
    SUBMIT = "submit"
    OPERATE = "operate"
    WORKER = "worker"


ROLE_IMPLIES: Mapping[Role, frozenset[Role]] = {
    Role.READ: frozenset({Role.READ}),
    Role.SUBMIT: frozenset({Role.SUBMIT, Role.READ}),
    Role.OPERATE: frozenset({Role.OPERATE, Role.SUBMIT, Role.READ}),
    Role.WORKER: frozenset({Role.WORKER}),
}

IDENTITY_KINDS = ("worker", "user", "coordinator")


def effective_roles(granted: Iterable[Role]) -> frozenset[Role]:
    """The roles ``granted`` gives, implications included."""
    out: set[Role] = set()
    for r in granted:
        out |= ROLE_IMPLIES[r]
    return frozenset(out)


def parse_roles(values: Iterable[str], field_name: str = "roles") -> frozenset[Role]:
    """``{"submit", "read"}`` -> roles; an unknown name raises ConfigError naming the field."""
    out = set()
    for v in values:
        try:
            out.add(Role(v.strip().lower()))
        except ValueError:
            valid = ", ".join(r.value for r in Role)
            raise ConfigError(
                f"{field_name}: unknown role {v!r}; expected one of {valid}"
            ) from None
    return frozenset(out)


def check_name(name: str, field_name: str) -> str:
    """An identity name follows the id rule (:mod:`plait.ids`)."""
    why = describe_id(name)
    if why:
        raise ConfigError(f"{field_name} {why}")
    return name


def identity_uri(kind: str, name: str) -> str:
    """``plait://worker/w1``: the URI SAN a certificate of this identity carries."""
    if kind not in IDENTITY_KINDS:
        raise ValueError(f"identity kind {kind!r}; expected one of {', '.join(IDENTITY_KINDS)}")
    return f"{IDENTITY_SCHEME}://{kind}/{check_name(name, 'name')}"


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a verified certificate says its holder is."""

    kind: str  # worker | user | coordinator | "" (a certificate without a plait URI)
    name: str
    roles: frozenset[Role]
    subject: str  # RFC 4514 text, for messages
    coordinator: bool = False  # OU=coordinator (and kind coordinator)

    @property
    def principal(self) -> str:
        """``worker:w1``, ``user:alice``; the subject when the certificate has no plait URI."""
        return f"{self.kind}:{self.name}" if self.kind else self.subject


def identity_from_pem(pem: bytes) -> CertIdentity:
    """Reads the identity convention out of a PEM certificate (already verified by TLS).

    Raises:
        ValueError: the bytes are not a certificate.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    ous = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    roles = set()
    for ou in ous:
        try:
            roles.add(Role(ou.lower()))
        except ValueError:
            continue  # OU=coordinator and unrelated OUs grant no client role
    kind = name = ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    prefix = f"{IDENTITY_SCHEME}://"
    for uri in uris:
        if uri.startswith(prefix):
            k, _, n = uri[len(prefix) :].partition("/")
            if k in IDENTITY_KINDS and describe_id(n) is None:
                kind, name = k, n
                break
    return CertIdentity(
        kind=kind,
        name=name,
        roles=frozenset(roles),
        subject=cert.subject.rfc4514_string(),
        coordinator=kind == "coordinator" and COORDINATOR_OU in [o.lower() for o in ous],
    )


# -- tokens ---------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: ``plait_`` and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 digest a token file stores (tokens are random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One line of the token file: who holds the token and what it may do."""

    name: str
    roles: frozenset[Role]
    sha256: str
    created: str = ""


def load_token_file(path: str) -> dict[str, TokenEntry]:
    """Reads a token file into ``{sha256: entry}``.

    Format (TOML; ``plait tokens create`` writes it)::

        [[tokens]]
        name = "alice"
        roles = ["submit"]
        sha256 = "9f86d0..."          # hex digest of the token; the token itself is not kept
        created = "2026-12-02T07:42:00Z"

    Raises:
        ConfigError: unreadable file or a bad entry, naming the file, the entry and the field.
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"token file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"token file {path}: {e}") from e
    out: dict[str, TokenEntry] = {}
    entries = table.get("tokens", [])
    if not isinstance(entries, list):
        raise ConfigError(f"token file {path}: 'tokens' must be an array of tables ([[tokens]])")
    for i, raw in enumerate(entries):
        where = f"token file {path}: tokens[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        name = raw.get("name")
        digest = str(raw.get("sha256", "")).lower()
        roles = raw.get("roles")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: missing")
        check_name(name, f"{where}.name")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}.sha256: must be 64 hex digits (the token's SHA-256)")
        if not isinstance(roles, list) or not roles:
            raise ConfigError(f"{where}.roles: must be a non-empty list of role names")
        if digest in out:
            raise ConfigError(f"{where}.sha256: the same token is listed twice")
        out[digest] = TokenEntry(
            name, parse_roles(roles, f"{where}.roles"), digest, str(raw.get("created", ""))
        )
    return out


def token_file_text(entries: Iterable[TokenEntry]) -> str:
    """Renders entries back into the token file format (hashes only)."""
    lines = ["# Plait token file: SHA-256 digests only; `plait tokens create` adds entries.\n"]
    for e in entries:
        roles = ", ".join(f'"{r.value}"' for r in sorted(e.roles, key=lambda r: r.value))
        lines.append(
            f'\n[[tokens]]\nname = "{e.name}"\nroles = [{roles}]\nsha256 = "{e.sha256}"\n'
            + (f'created = "{e.created}"\n' if e.created else "")
        )
    return "".join(lines)


def match_token(entries: Mapping[str, TokenEntry], token: str) -> TokenEntry | None:
    """The entry of a presented token, compared in constant time on its digest."""
    if not _TOKEN_RE.fullmatch(token):
        return None
    digest = hash_token(token)
    entry = entries.get(digest)
    if entry is not None and hmac.compare_digest(entry.sha256, digest):
        return entry
    return None


# -- transport ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A peer's TLS material: the CA that signs coordinators, and its own certificate and key.

    ``ca`` alone gives server-authenticated TLS; with ``cert`` and ``key`` the peer also
    presents a client certificate (mTLS; needed for WorkerService). ``server_name`` overrides
    the name checked against the coordinator's certificate (dialling by an address its
    certificate does not list).
    """

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    # name -> (the file's identity when read, its bytes): re-read once the file changes.
    _cache: dict[str, tuple[tuple[int, int, int, int], bytes]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"--tls-{name} {path}: no such file")

    def read(self, name: str) -> bytes:
        """The bytes of the ``ca``/``cert``/``key`` file, read again once the file changed
        (renewed certificates are used from the next connection: a worker's reconnect, a new
        client channel), else from memory."""
        path = getattr(self, name)
        try:
            st = os.stat(path)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == identity:
                return cached[1]
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"--tls-{name} {path}: {e.strerror or e}") from e
        self._cache[name] = (identity, data)
        return data


def tls_from_env(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> TlsFiles | None:
    """Flags first, then ``PLAIT_TLS_CA``/``_CERT``/``_KEY``/``_SERVER_NAME``; None: plaintext.

    Raises:
        ConfigError: a certificate without a CA, or a file that does not exist.
    """
    env = os.environ if environ is None else environ
    ca = ca or env.get("PLAIT_TLS_CA") or None
    cert = cert or env.get("PLAIT_TLS_CERT") or None
    key = key or env.get("PLAIT_TLS_KEY") or None
    server_name = server_name or env.get("PLAIT_TLS_SERVER_NAME") or None
    if ca is None:
        if cert or key:
            raise ConfigError(
                "--tls-cert/--tls-key need --tls-ca (the CA that signed the coordinator)"
            )
        return None
    return TlsFiles(ca, cert, key, server_name)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC channel credentials for ``tls`` (with a client certificate when it has one)."""
    if tls.cert is not None:
        return grpc.ssl_channel_credentials(tls.read("ca"), tls.read("key"), tls.read("cert"))
    return grpc.ssl_channel_credentials(tls.read("ca"))


def channel_options_for(tls: TlsFiles | None) -> list[tuple[str, Any]]:
    """Extra channel arguments TLS needs (the server-name override)."""
    if tls is not None and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def host_of(address: str) -> str:
    """The host of ``HOST:PORT`` (brackets of an IPv6 literal removed)."""
    return address.rpartition(":")[0].strip("[]")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IPs."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(addresses: Iterable[str], tls: TlsFiles | None, token: str) -> None:
    """Refuses to send a bearer token in the clear to a host beyond this one.

    Raises:
        ConfigError: ``token`` is set, ``tls`` is None and an address is not loopback.
    """
    if not token or tls is not None:
        return
    for address in addresses:
        if not is_loopback_host(host_of(address)):
            raise ConfigError(
                f"refusing to send a bearer token to {address} without TLS: set --tls-ca"
                " (or PLAIT_TLS_CA) to the CA that signed the coordinator, or use a loopback"
                " address"
            )
