"""A development certificate authority for Plait's identity convention (foundation layer).

Makes a CA and issues coordinator, worker and user certificates the way
:mod:`plait.security` reads them: a URI SAN ``plait://<kind>/<name>``, one subject ``OU`` per
role, ``OU=coordinator`` on coordinator certificates. ``plait certs`` is the command line over
this module; tests build their PKI with it too.

Keys are ECDSA P-256: gRPC's TLS stack (BoringSSL) accepts them everywhere, which is not true of
Ed25519. Private keys are written unencrypted with mode 0600, certificates with mode 0644, and
no existing file is ever overwritten unless the caller asks (``force``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plait.clock import Clock, SystemClock, wall_datetime
from plait.errors import ConfigError
from plait.security import COORDINATOR_OU, IDENTITY_KINDS, Role, identity_uri, parse_roles

__all__ = [
    "CA_CERT_FILE",
    "CA_COMMON_NAME",
    "CA_KEY_FILE",
    "CA_STEM",
    "CERT_MODE",
    "DEFAULT_CA_DAYS",
    "DEFAULT_LEAF_DAYS",
    "KEY_MODE",
    "CertAuthority",
    "check_absent",
    "issue",
    "load_ca",
    "make_ca",
    "write_ca",
    "write_file",
    "write_pair",
]

CA_COMMON_NAME = "Plait development CA"
CA_STEM = "ca"
CA_CERT_FILE = f"{CA_STEM}.crt"
CA_KEY_FILE = f"{CA_STEM}.key"
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 365
KEY_MODE = 0o600
CERT_MODE = 0o644
# Certificates start a little in the past, so a peer whose clock runs slightly behind the
# issuer's does not reject a certificate that was issued a second ago.
_BACKDATE = dt.timedelta(minutes=5)
_DNS_RE = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class CertAuthority:
    """A CA certificate and its private key, able to issue leaf certificates."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM (what peers give as ``--tls-ca``)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA private key in unencrypted PKCS#8 PEM."""
        return _key_pem(self.key)

    def issue(
        self,
        kind: str,
        name: str,
        roles: Iterable[Role | str] = (),
        hosts: Iterable[str] = (),
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        clock: Clock | None = None,
    ) -> tuple[bytes, bytes]:
        """:func:`issue` with this CA; returns ``(cert_pem, key_pem)``."""
        return issue(
            self.cert, self.key, kind, name, roles, hosts, days, not_before, not_after, clock
        )


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    clock: Clock | None,
) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ConfigError(f"--days {days}: must be at least 1")
    now = wall_datetime(clock or SystemClock())
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    if end <= start:
        raise ConfigError(f"certificate validity ends ({end}) before it starts ({start})")
    return start, end


def make_ca(
    common_name: str = CA_COMMON_NAME,
    days: int = DEFAULT_CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    clock: Clock | None = None,
) -> CertAuthority:
    """A new self-signed CA (ECDSA P-256), valid ``days`` (10 years by default)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before, not_after, clock)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert, key)


def _host_san(host: str) -> x509.GeneralName:
    h = host.strip().strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(h))
    except ValueError:
        pass
    if len(h) > 253 or not _DNS_RE.fullmatch(h):
        raise ConfigError(f"--host {host!r}: not a DNS name or an IP address")
    return x509.DNSName(h.lower())


def _subject_roles(kind: str, roles: Iterable[Role | str]) -> list[str]:
    granted = set(parse_roles([str(r) for r in roles], "--role"))
    if kind == "worker":
        granted.add(Role.WORKER)  # a worker certificate always grants the worker role
    ous = sorted(r.value for r in granted)
    if kind == "coordinator":
        ous.append(COORDINATOR_OU)
    return ous


def issue(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    kind: str,
    name: str,
    roles: Iterable[Role | str] = (),
    hosts: Iterable[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    clock: Clock | None = None,
) -> tuple[bytes, bytes]:
    """Issues a certificate for identity ``plait://<kind>/<name>``; returns ``(cert, key)`` PEM.

    The subject is ``CN=<name>`` with one ``OU`` per role; a worker certificate always carries
    ``OU=worker`` and a coordinator certificate ``OU=coordinator``. Coordinators also get a DNS
    or IP SAN per entry of ``hosts`` (what clients dial) and may act as TLS server and client;
    workers and users are TLS clients only. ``not_before``/``not_after`` override ``days``
    (tests use them to make an expired certificate).

    Raises:
        ConfigError: unknown kind or role, a bad name or host, hosts on a non-coordinator, or an
            empty validity period.
    """
    if kind not in IDENTITY_KINDS:
        raise ConfigError(f"certificate kind {kind!r}; expected one of {', '.join(IDENTITY_KINDS)}")
    uri = identity_uri(kind, name)  # checks the name (ConfigError)
    host_list = list(hosts)
    if host_list and kind != "coordinator":
        raise ConfigError(f"--host: only coordinator certificates name hosts, not {kind} ones")
    ous = _subject_roles(kind, roles)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for h in host_list:
        san = _host_san(h)
        if san not in sans:
            sans.append(san)
    start, end = _validity(days, not_before, not_after, clock)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
        + [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "coordinator":
        # Coordinators serve clients and also dial each other (standbys follow the leader).
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# -- files ----------------------------------------------------------------------------------


def write_file(path: str, data: bytes, mode: int, force: bool = False) -> None:
    """Writes ``data`` to ``path`` with exactly ``mode`` (umask ignored).

    Without ``force`` an existing file is an error; with it the file is replaced atomically, so
    a reader never sees half a key.

    Raises:
        ConfigError: the file exists (and not ``force``), or it cannot be written.
    """
    directory = os.path.dirname(path) or "."
    try:
        if not force:
            # O_EXCL: the existence check and the creation are one step.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
            return
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plait-")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from e


def write_pair(
    directory: str, stem: str, cert_pem: bytes, key_pem: bytes, force: bool = False
) -> tuple[str, str]:
    """Writes ``<stem>.crt`` (0644) and ``<stem>.key`` (0600) under ``directory``.

    Both files are checked before either is written, so a refusal leaves nothing behind.

    Returns:
        The certificate and key paths.

    Raises:
        ConfigError: a file exists (and not ``force``), or cannot be written.
    """
    cert_path = os.path.join(directory, f"{stem}.crt")
    key_path = os.path.join(directory, f"{stem}.key")
    check_absent([cert_path, key_path], force)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--dir {directory}: {e.strerror or e}") from e
    write_file(key_path, key_pem, KEY_MODE, force)
    write_file(cert_path, cert_pem, CERT_MODE, force)
    return cert_path, key_path


def check_absent(paths: Iterable[str], force: bool) -> None:
    """Raises ConfigError naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for p in paths:
        if os.path.lexists(p):
            raise ConfigError(f"{p} already exists; pass --force to overwrite it")


def write_ca(ca: CertAuthority, directory: str, force: bool = False) -> tuple[str, str]:
    """Writes ``ca.crt`` and ``ca.key`` under ``directory``; returns their paths."""
    return write_pair(directory, CA_STEM, ca.cert_pem, ca.key_pem, force)


def load_ca(directory: str) -> CertAuthority:
    """Reads ``ca.crt`` and ``ca.key`` from ``directory`` (as ``plait certs init`` wrote them).

    Raises:
        ConfigError: a file is missing or unreadable, the certificate is not a CA, or the key
            does not belong to it.
    """
    cert_path = os.path.join(directory, CA_CERT_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except FileNotFoundError as e:
        raise ConfigError(
            f"--dir {directory}: no {os.path.basename(str(e.filename))}; create a CA with"
            f" `plait certs init --dir {directory}`"
        ) from None
    except OSError as e:
        raise ConfigError(f"{e.filename}: {e.strerror or e}") from e
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise ConfigError(f"{cert_path}: not a PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: expected an ECDSA key, got {type(key).__name__}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{cert_path}: not a CA certificate (BasicConstraints ca=false)")
    if key.public_key().public_numbers() != _ec_public(cert).public_numbers():
        raise ConfigError(f"{key_path}: this key does not belong to {cert_path}")
    return CertAuthority(cert, key)


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ConfigError(f"CA certificate has a {type(pub).__name__}; expected ECDSA")
    return pub
