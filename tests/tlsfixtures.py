"""A ready-made PKI for TLS tests (test support): trusted, untrusted, expired, wrong-host.

Built with :mod:`plait.certs`, so it follows the same convention as ``plait certs``. Use the
session fixture::

    from tests.tlsfixtures import Pki, pki  # noqa: F401  (pytest finds the fixture by name)

    async def test_x(pki: Pki) -> None:  # noqa: F811
        tls = pki.tls_files(pki.user("operator"))

or call :func:`make_pki` on a directory of your own (memoized per directory).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from plait import certs
from plait.clock import SystemClock, wall_datetime
from plait.security import TlsFiles

__all__ = ["USERS", "WORKERS", "CertPair", "Pki", "make_pki", "pki"]

COORDINATOR_NAME = "coord"
COORDINATOR_HOSTS = ("localhost", "127.0.0.1")
WORKERS = ("w1", "w2")
# name -> roles; "nobody" is a valid certificate that grants nothing.
USERS: dict[str, tuple[str, ...]] = {
    "reader": ("read",),
    "submitter": ("submit",),
    "operator": ("operate",),
    "nobody": (),
}


@dataclass(frozen=True, slots=True)
class CertPair:
    """Paths of a PEM certificate and its private key."""

    cert: str
    key: str

    def pem(self) -> tuple[bytes, bytes]:
        """``(key, cert)`` bytes, in the order ``grpc.ssl_server_credentials`` wants."""
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes()


@dataclass(frozen=True, slots=True)
class Pki:
    """Every certificate the TLS and authorization tests need, as file paths.

    Trusted (signed by ``ca``): ``coordinator`` (``plait://coordinator/coord``, hosts localhost
    and 127.0.0.1), ``worker("w1"|"w2")``, ``user("reader"|"submitter"|"operator"|"nobody")``,
    ``expired`` (user ``expired``, role operate, validity ended yesterday) and
    ``wrong_host_coordinator`` (``plait://coordinator/coord``, host ``wrong.example`` only).
    Signed by ``untrusted_ca`` instead: ``untrusted_coordinator``, ``untrusted_worker_w1`` and
    ``untrusted_operator``, with the same names as their trusted twins.
    """

    dir: str
    ca: str
    ca_key: str
    coordinator: CertPair
    expired: CertPair
    wrong_host_coordinator: CertPair
    untrusted_ca: str
    untrusted_coordinator: CertPair
    untrusted_worker_w1: CertPair
    untrusted_operator: CertPair
    workers: dict[str, CertPair] = field(default_factory=dict)
    users: dict[str, CertPair] = field(default_factory=dict)

    def worker(self, worker_id: str) -> CertPair:
        """The trusted certificate of worker ``w1`` or ``w2``."""
        return self.workers[worker_id]

    def user(self, name: str) -> CertPair:
        """The trusted certificate of ``reader``, ``submitter``, ``operator`` or ``nobody``."""
        return self.users[name]

    def tls_files(self, pair: CertPair | None = None, ca: str | None = None) -> TlsFiles:
        """A client's TLS files: this PKI's CA (or ``ca``) and, for mTLS, ``pair``."""
        return TlsFiles(ca or self.ca, pair.cert if pair else None, pair.key if pair else None)


_CACHE: dict[Path, Pki] = {}


def _pair(directory: Path, stem: str, pem: tuple[bytes, bytes]) -> CertPair:
    cert, key = certs.write_pair(str(directory), stem, pem[0], pem[1])
    return CertPair(cert, key)


def make_pki(tmp_dir: Path | str) -> Pki:
    """Creates the PKI under ``tmp_dir`` (``trusted/`` and ``untrusted/``); memoized per dir."""
    root = Path(tmp_dir).resolve()
    if root in _CACHE:
        return _CACHE[root]
    trusted, untrusted = root / "trusted", root / "untrusted"
    now = wall_datetime(SystemClock())

    ca = certs.make_ca()
    ca_cert, ca_key = certs.write_ca(ca, str(trusted))
    expired = ca.issue(
        "user",
        "expired",
        roles=["operate"],
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )

    # A second CA nobody trusts, issuing the same identities: proves that trust comes from the
    # signature, not from what a certificate claims.
    other = certs.make_ca(common_name="Untrusted CA")
    other_cert, _ = certs.write_ca(other, str(untrusted))

    pki = Pki(
        dir=str(root),
        ca=ca_cert,
        ca_key=ca_key,
        coordinator=_pair(
            trusted,
            "coordinator",
            ca.issue("coordinator", COORDINATOR_NAME, hosts=COORDINATOR_HOSTS),
        ),
        expired=_pair(trusted, "client-expired", expired),
        wrong_host_coordinator=_pair(
            trusted,
            "coordinator-wrong-host",
            ca.issue("coordinator", COORDINATOR_NAME, hosts=["wrong.example"]),
        ),
        workers={w: _pair(trusted, f"worker-{w}", ca.issue("worker", w)) for w in WORKERS},
        users={
            u: _pair(trusted, f"client-{u}", ca.issue("user", u, roles=roles))
            for u, roles in USERS.items()
        },
        untrusted_ca=other_cert,
        untrusted_coordinator=_pair(
            untrusted,
            "coordinator",
            other.issue("coordinator", COORDINATOR_NAME, hosts=COORDINATOR_HOSTS),
        ),
        untrusted_worker_w1=_pair(untrusted, "worker-w1", other.issue("worker", "w1")),
        untrusted_operator=_pair(
            untrusted, "client-operator", other.issue("user", "operator", roles=["operate"])
        ),
    )
    _CACHE[root] = pki
    return pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's PKI (made once, in a session temp directory)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
