"""`plait.certs`, `plait certs` and `plait tokens`: the identity convention, files, TLS."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from plait import certs, security
from plait.cli.main import main
from plait.errors import ConfigError
from plait.security import Role, identity_from_pem
from tests.tlsfixtures import Pki, make_pki, pki  # noqa: F401


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _ident(path: str | Path) -> security.CertIdentity:
    return identity_from_pem(Path(path).read_bytes())


def _cert(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _sans(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    san = _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.UniformResourceIdentifier),
        san.get_values_for_type(x509.DNSName),
        [str(i) for i in san.get_values_for_type(x509.IPAddress)],
    )


# -- library ----------------------------------------------------------------------------------


def test_issued_identities_follow_the_convention() -> None:
    ca = certs.make_ca()
    worker = identity_from_pem(ca.issue("worker", "w1")[0])
    assert (worker.kind, worker.name, worker.roles, worker.coordinator) == (
        "worker",
        "w1",
        frozenset({Role.WORKER}),
        False,
    )
    user = identity_from_pem(ca.issue("user", "alice", roles=["submit", Role.READ])[0])
    assert (user.kind, user.principal, user.roles) == (
        "user",
        "user:alice",
        frozenset({Role.SUBMIT, Role.READ}),
    )
    coord = identity_from_pem(ca.issue("coordinator", "c1", hosts=["localhost"])[0])
    assert (coord.kind, coord.name, coord.roles, coord.coordinator) == (
        "coordinator",
        "c1",
        frozenset(),
        True,
    )
    assert identity_from_pem(ca.issue("user", "nobody")[0]).roles == frozenset()


def test_ca_and_leaf_extensions() -> None:
    ca = certs.make_ca()
    assert ca.cert.subject.rfc4514_string() == "CN=Plait development CA"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    life = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3651)

    coord = x509.load_pem_x509_certificate(ca.issue("coordinator", "c", hosts=["h"])[0])
    user = x509.load_pem_x509_certificate(ca.issue("user", "u", roles=["read"])[0])
    eku = x509.oid.ExtendedKeyUsageOID
    coord_eku = coord.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(coord_eku) == [eku.SERVER_AUTH, eku.CLIENT_AUTH]
    user_eku = user.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(user_eku) == [eku.CLIENT_AUTH]
    assert not user.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert user.issuer == ca.cert.subject
    life = user.not_valid_after_utc - user.not_valid_before_utc
    assert dt.timedelta(days=365) <= life < dt.timedelta(days=366)


def test_coordinator_hosts_become_dns_and_ip_sans() -> None:
    ca = certs.make_ca()
    pem, _ = ca.issue("coordinator", "c1", hosts=["localhost", "127.0.0.1", "[::1]", "Db.Example"])
    san = x509.load_pem_x509_certificate(pem).extensions
    value = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert value.get_values_for_type(x509.UniformResourceIdentifier) == ["plait://coordinator/c1"]
    assert value.get_values_for_type(x509.DNSName) == ["localhost", "db.example"]
    assert [str(i) for i in value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("kind", "name", "kwargs", "fragment"),
    [
        ("robot", "r", {}, "kind 'robot'"),
        ("user", "a/b", {}, "'a/b'"),
        ("user", "u", {"roles": ["admin"]}, "unknown role 'admin'"),
        ("worker", "w", {"hosts": ["h"]}, "only coordinator"),
        ("coordinator", "c", {"hosts": ["bad host"]}, "not a DNS name"),
        ("user", "u", {"days": 0}, "--days 0"),
    ],
)
def test_issue_rejects(kind: str, name: str, kwargs: dict[str, Any], fragment: str) -> None:
    ca = certs.make_ca()
    with pytest.raises(ConfigError, match=fragment):
        ca.issue(kind, name, **kwargs)


def test_expired_certificate_is_expired(pki: Pki) -> None:  # noqa: F811
    cert = _cert(pki.expired.cert)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert _ident(pki.expired.cert).roles == frozenset({Role.OPERATE})


def test_files_modes_and_no_overwrite(tmp_path: Path) -> None:
    ca = certs.make_ca()
    cert, key = ca.issue("worker", "w1")
    old = os.umask(0o077)  # modes are exact whatever the umask
    try:
        cert_path, key_path = certs.write_pair(str(tmp_path / "d"), "worker-w1", cert, key)
    finally:
        os.umask(old)
    assert (_mode(cert_path), _mode(key_path)) == (0o644, 0o600)
    with pytest.raises(ConfigError, match=r"worker-w1\.crt already exists; pass --force"):
        certs.write_pair(str(tmp_path / "d"), "worker-w1", b"x", b"y")
    assert Path(key_path).read_bytes() == key
    cert2, key2 = ca.issue("worker", "w1")
    certs.write_pair(str(tmp_path / "d"), "worker-w1", cert2, key2, force=True)
    assert Path(key_path).read_bytes() == key2
    assert (_mode(cert_path), _mode(key_path)) == (0o644, 0o600)


def test_load_ca_round_trip_and_errors(tmp_path: Path) -> None:
    ca = certs.make_ca()
    certs.write_ca(ca, str(tmp_path))
    loaded = certs.load_ca(str(tmp_path))
    assert loaded.cert == ca.cert
    assert _mode(tmp_path / "ca.key") == 0o600
    with pytest.raises(ConfigError, match=r"no ca\.crt; create a CA with `plait certs init"):
        certs.load_ca(str(tmp_path / "missing"))
    other = certs.make_ca()
    (tmp_path / "ca.key").write_bytes(other.key_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        certs.load_ca(str(tmp_path))


def test_pki_fixture_contents(pki: Pki) -> None:  # noqa: F811
    assert make_pki(pki.dir) is pki  # memoized per directory
    coord = _ident(pki.coordinator.cert)
    assert (coord.principal, coord.coordinator) == ("coordinator:coord", True)
    assert _sans(pki.coordinator.cert)[1:] == (["localhost"], ["127.0.0.1"])
    assert _sans(pki.wrong_host_coordinator.cert)[1:] == (["wrong.example"], [])
    for w in ("w1", "w2"):
        assert _ident(pki.worker(w).cert).principal == f"worker:{w}"
    expected = {
        "reader": {"read"},
        "submitter": {"submit"},
        "operator": {"operate"},
        "nobody": set(),
    }
    for user, roles in expected.items():
        ident = _ident(pki.user(user).cert)
        assert (ident.principal, {r.value for r in ident.roles}) == (f"user:{user}", roles)
    untrusted_issuer = _cert(pki.untrusted_ca).subject
    for pair in (pki.untrusted_coordinator, pki.untrusted_worker_w1, pki.untrusted_operator):
        assert _cert(pair.cert).issuer == untrusted_issuer
    assert _ident(pki.untrusted_worker_w1.cert).principal == "worker:w1"
    assert _ident(pki.untrusted_operator.cert).roles == frozenset({Role.OPERATE})
    assert _cert(pki.coordinator.cert).issuer == _cert(pki.ca).subject


# -- plait certs ------------------------------------------------------------------------------


def test_cli_certs_init_worker_client_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "pki")
    assert main(["certs", "init", "--dir", d, "--coordinator-host", "coord.example"]) == 0
    names = sorted(os.listdir(d))
    assert names == [f"{s}.{e}" for s in ("admin", "ca", "coordinator") for e in ("crt", "key")]
    assert all(_mode(Path(d, n)) == (0o600 if n.endswith(".key") else 0o644) for n in names)
    assert _sans(Path(d, "coordinator.crt")) == (
        ["plait://coordinator/coordinator"],
        ["coord.example"],
        [],
    )
    admin = _ident(Path(d, "admin.crt"))
    assert (admin.principal, admin.roles) == ("user:admin", frozenset({Role.OPERATE}))

    assert main(["certs", "worker", "w1", "w2", "--dir", d]) == 0
    assert _ident(Path(d, "worker-w2.crt")).principal == "worker:w2"
    assert _mode(Path(d, "worker-w2.key")) == 0o600
    args = ["certs", "client", "bob", "--role", "read", "--role", "submit", "--dir", d]
    assert main(args) == 0
    bob = _ident(Path(d, "client-bob.crt"))
    assert bob.roles == frozenset({Role.READ, Role.SUBMIT})
    hosts = ["--host", "c2.example", "--host", "10.0.0.2"]
    assert main(["certs", "coordinator", "c2", *hosts, "--dir", d, "--days", "30"]) == 0
    assert _sans(Path(d, "coordinator-c2.crt")) == (
        ["plait://coordinator/c2"],
        ["c2.example"],
        ["10.0.0.2"],
    )
    capsys.readouterr()

    assert main(["certs", "show", str(Path(d, "worker-w1.crt"))]) == 0
    out = capsys.readouterr().out
    assert "principal:   worker:w1" in out
    assert "roles:       worker" in out
    assert "URI:plait://worker/w1" in out
    assert "(valid)" in out


def test_cli_certs_init_defaults_hosts(tmp_path: Path) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert _sans(tmp_path / "coordinator.crt")[1:] == (["localhost"], ["127.0.0.1"])


def test_cli_show_expired(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert main(["certs", "show", pki.expired.cert]) == 0
    assert "(EXPIRED)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["certs", "client", "bob", "--role", "admin"], "--role 'admin': expected one of"),
        (["certs", "client", "bob", "--role", "worker"], "plait certs worker"),
        (["certs", "client", "b/ob", "--role", "read"], "NAME 'b/ob' must be"),
        (["certs", "worker", "w1", "../x"], "WORKER_ID '../x' must be"),
        (["certs", "worker", "w1", "--days", "0"], "--days 0: must be at least 1"),
        (["certs", "coordinator", "c", "--host", "a b"], "--host 'a b': not a DNS name"),
        (["certs", "worker", "w1"], "worker-w1.crt already exists; pass --force"),
    ],
)
def test_cli_certs_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    d = str(tmp_path)
    assert main(["certs", "init", "--dir", d]) == 0
    assert main(["certs", "worker", "w1", "--dir", d]) == 0
    capsys.readouterr()
    assert main([*argv, "--dir", d]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: ")
    assert fragment in err


def test_cli_certs_init_refuses_existing_dir_then_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    assert main(["certs", "init", "--dir", d]) == 0
    ca_before = Path(d, "ca.crt").read_bytes()
    assert main(["certs", "init", "--dir", d]) == 2
    assert "ca.crt already exists; pass --force" in capsys.readouterr().err
    assert Path(d, "ca.crt").read_bytes() == ca_before
    assert main(["certs", "init", "--dir", d, "--force"]) == 0
    assert Path(d, "ca.crt").read_bytes() != ca_before


def test_cli_certs_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "worker", "w1", "--dir", str(tmp_path)]) == 2
    assert "plait certs init" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_show_not_a_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.crt"
    bad.write_text("hello")
    assert main(["certs", "show", str(bad)]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err


# -- plait tokens -----------------------------------------------------------------------------


def test_cli_tokens_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "tokens.toml")
    assert main(["tokens", "create", "--file", f, "--name", "alice", "--role", "submit"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"  # only the token on stdout
    assert "store it now" in err and f in err and "SIGHUP" in err
    assert _mode(f) == 0o600
    assert token not in Path(f).read_text()

    args = ["--role", "read", "--role", "operate"]
    assert main(["tokens", "create", "--file", f, "--name", "bob", *args]) == 0
    bob_token = capsys.readouterr().out.strip()
    assert main(["tokens", "create", "--file", f, "--name", "w1", "--role", "worker"]) == 0
    capsys.readouterr()

    entries = security.load_token_file(f)
    alice = security.match_token(entries, token)
    assert alice is not None
    assert (alice.name, alice.roles) == ("alice", frozenset({Role.SUBMIT}))
    assert dt.datetime.strptime(alice.created, "%Y-%m-%dT%H:%M:%SZ")  # noqa: DTZ007
    bob = security.match_token(entries, bob_token)
    assert bob is not None and bob.roles == frozenset({Role.READ, Role.OPERATE})

    assert main(["tokens", "list", "--file", f]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "read,operate" not in listing and "operate,read" in listing
    assert alice.sha256[:8] in listing and alice.sha256[:9] not in listing

    assert main(["tokens", "revoke", "--file", f, "alice"]) == 0
    assert "revoked 1 token(s) of alice" in capsys.readouterr().err
    entries = security.load_token_file(f)
    assert security.match_token(entries, token) is None
    assert security.match_token(entries, bob_token) is not None
    assert _mode(f) == 0o600

    assert main(["tokens", "revoke", "--file", f, "alice"]) == 2
    assert "plait: error: NAME 'alice': no token" in capsys.readouterr().err


def test_cli_tokens_revoke_one_by_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "tokens.toml")
    for _ in range(2):
        assert main(["tokens", "create", "--file", f, "--name", "ci", "--role", "submit"]) == 0
    old, new = capsys.readouterr().out.split()
    old_hash = security.hash_token(old)
    assert main(["tokens", "revoke", "--file", f, "ci", "--hash", old_hash[:8]]) == 0
    entries = security.load_token_file(f)
    assert security.match_token(entries, old) is None
    assert security.match_token(entries, new) is not None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["create", "--name", "a", "--role", "boss"], "--role: unknown role 'boss'"),
        (["create", "--name", "a b", "--role", "read"], "--name 'a b' must be"),
        (["list"], "No such file"),
    ],
)
def test_cli_tokens_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    f = str(tmp_path / "tokens.toml")
    assert main(["tokens", argv[0], "--file", f, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: ") and fragment in err
    assert not os.path.exists(f)


# -- a real TLS handshake -----------------------------------------------------------------------


class _RecordingHealth(HealthServicer):  # type: ignore[misc]
    """Health that remembers who called, as the TLS layer verified it."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[security.CertIdentity] = []

    async def Check(self, request: Any, context: Any) -> Any:
        pem = context.auth_context()["x509_pem_cert"][0]
        self.callers.append(identity_from_pem(pem))
        return await super().Check(request, context)


async def _check(port: int, tls: security.TlsFiles) -> Any:
    creds = security.channel_credentials(tls)
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)


async def _serve(server_pair: tuple[bytes, bytes], ca: bytes) -> tuple[grpc.aio.Server, int, Any]:
    server = grpc.aio.server()
    health = _RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    creds = grpc.ssl_server_credentials(
        [server_pair], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port, health


async def test_mtls_handshake_carries_the_worker_identity(pki: Pki) -> None:  # noqa: F811
    ca = Path(pki.ca).read_bytes()
    server, port, health = await _serve(pki.coordinator.pem(), ca)
    try:
        resp = await _check(port, pki.tls_files(pki.worker("w1")))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        [caller] = health.callers
        assert (caller.kind, caller.name, caller.roles) == (
            "worker",
            "w1",
            frozenset({Role.WORKER}),
        )

        # What TLS must refuse: another CA's w1, an expired certificate, no certificate.
        for tls in (
            pki.tls_files(pki.untrusted_worker_w1),
            pki.tls_files(pki.expired),
            pki.tls_files(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _check(port, tls)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, tls
        assert len(health.callers) == 1
    finally:
        await server.stop(None)


async def test_client_refuses_wrong_host_coordinator(pki: Pki) -> None:  # noqa: F811
    ca = Path(pki.ca).read_bytes()
    server, port, health = await _serve(pki.wrong_host_coordinator.pem(), ca)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(port, pki.tls_files(pki.user("operator")))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health.callers == []
    finally:
        await server.stop(None)


async def test_cli_made_certificates_work_for_mtls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path
    assert main(["certs", "init", "--dir", str(d)]) == 0
    pair = ((d / "coordinator.key").read_bytes(), (d / "coordinator.crt").read_bytes())
    server, port, health = await _serve(pair, (d / "ca.crt").read_bytes())
    try:
        tls = security.TlsFiles(str(d / "ca.crt"), str(d / "admin.crt"), str(d / "admin.key"))
        await _check(port, tls)
        assert [c.principal for c in health.callers] == ["user:admin"]
    finally:
        await server.stop(None)
