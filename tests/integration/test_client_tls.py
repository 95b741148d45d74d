"""Clients and workers over TLS: channels, bearer tokens, and which leader hints are followed.

In-test grpc.aio servers on 127.0.0.1:0 with ``grpc.ssl_server_credentials`` play the
coordinators, with certificates from :mod:`tests.tlsfixtures`. A leader hint outside the
``--coordinator`` list is followed only when the address's certificate verifies as a
coordinator's (:func:`plait.trust.verify_coordinator`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plait import certs
from plait.cli.main import main
from plait.client import Client
from plait.clock import SystemClock, wall_datetime
from plait.errors import UnavailableError
from plait.security import TlsFiles, identity_from_pem
from plait.trust import verify_coordinator
from plait.v1 import worker_service_pb2_grpc as wpb_grpc
from plait.v1 import workflow_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from plait.worker import SessionConfig, WorkerSession
from tests.integration.test_follow_leader import Standby, dead_address
from tests.integration.worker_session_support import FakeCoordinator
from tests.tlsfixtures import CertPair, Pki, pki  # noqa: F401

# ---------------------------------------------------------------- servers


class Recorder(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """GetWorkflow answers with this server's name and records who asked, and how."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.metadata: list[dict[str, str]] = []
        self.peers: list[str] = []

    async def GetWorkflow(self, request: Any, context: Any) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        pem = context.auth_context().get("x509_pem_cert")
        self.peers.append(identity_from_pem(pem[0]).principal if pem else "")
        status = workflow_pb2.WorkflowStatus(workflow_id=request.workflow_id, name=self.name)
        return workflow_service_pb2.GetWorkflowResponse(workflow=status)


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve_tls() -> AsyncIterator[Serve]:
    """Starts a TLS server presenting ``pair`` with the given servicers; returns its address."""
    servers: list[grpc.aio.Server] = []

    async def start(
        pair: CertPair,
        *,
        workflows: Any = None,
        generic: Any = None,
        workers: Any = None,
        client_ca: str | None = None,
    ) -> str:
        server = grpc.aio.server()
        if workflows is not None:
            workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(workflows, server)
        if workers is not None:
            wpb_grpc.add_WorkerServiceServicer_to_server(workers, server)
        if generic is not None:
            server.add_generic_rpc_handlers([generic])
        creds = grpc.ssl_server_credentials(
            [pair.pem()],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(None)


def impostor(pki: Pki, directory: Path) -> CertPair:  # noqa: F811
    """A server certificate for 127.0.0.1 from the trusted CA that is not a coordinator's."""
    ca = certs.load_ca(str(Path(pki.ca).parent))
    key = ec.generate_private_key(ec.SECP256R1())
    now = wall_datetime(SystemClock())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operate"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "impostor"),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("plait://user/impostor"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path, key_path = certs.write_pair(str(directory), "impostor", cert_pem, key_pem, force=True)
    return CertPair(path, key_path)


# ---------------------------------------------------------------- the certificate check


async def test_verify_coordinator(pki: Pki, serve_tls: Serve, tmp_path: Path) -> None:  # noqa: F811
    tls = pki.tls_files()
    good = await serve_tls(pki.coordinator, workflows=Recorder("c"))
    assert await asyncio.to_thread(verify_coordinator, good, tls) is None

    wrong_host = await serve_tls(pki.wrong_host_coordinator, workflows=Recorder("c"))
    why = await asyncio.to_thread(verify_coordinator, wrong_host, tls)
    assert why is not None and why.startswith("its certificate did not verify")
    # ... unless told which name to expect.
    named = TlsFiles(pki.ca, server_name="wrong.example")
    assert await asyncio.to_thread(verify_coordinator, wrong_host, named) is None

    untrusted = await serve_tls(pki.untrusted_coordinator, workflows=Recorder("c"))
    why = await asyncio.to_thread(verify_coordinator, untrusted, tls)
    assert why is not None and why.startswith("its certificate did not verify")

    fake = await serve_tls(impostor(pki, tmp_path), workflows=Recorder("c"))
    why = await asyncio.to_thread(verify_coordinator, fake, tls)
    assert why is not None and "is not a coordinator's" in why and "CN=impostor" in why

    why = await asyncio.to_thread(verify_coordinator, dead_address(), tls)
    assert why is not None and why.startswith("the TLS handshake failed")

    # A coordinator that requires client certificates: the check presents ours.
    mtls = await serve_tls(pki.coordinator, workflows=Recorder("c"), client_ca=pki.ca)
    with_cert = pki.tls_files(pki.user("reader"))
    assert await asyncio.to_thread(verify_coordinator, mtls, with_cert) is None


# ---------------------------------------------------------------- the client


async def test_client_over_mtls_sends_its_token(pki: Pki, serve_tls: Serve) -> None:  # noqa: F811
    recorder = Recorder("leader")
    address = await serve_tls(pki.coordinator, workflows=recorder, client_ca=pki.ca)
    tls = pki.tls_files(pki.user("operator"))
    with Client(address, tls=tls, token="plait_secret") as client:
        status = await asyncio.to_thread(client.get, "wf-1")
    assert status.name == "leader"
    assert recorder.metadata[0]["authorization"] == "Bearer plait_secret"
    assert recorder.peers == ["user:operator"]
    # With TLS a token may go beyond loopback (nothing is dialled until the first call).
    Client("coord.example:7450", tls=tls, token="plait_secret").close()


async def test_client_tls_from_the_environment(
    pki: Pki,  # noqa: F811
    serve_tls: Serve,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address = await serve_tls(pki.coordinator, workflows=Recorder("env"))
    monkeypatch.setenv("PLAIT_TLS_CA", pki.ca)
    with Client(address) as client:
        assert client.tls is not None and client.tls.ca == pki.ca
        assert (await asyncio.to_thread(client.get, "wf-1")).name == "env"


async def test_client_follows_an_unlisted_hint_only_to_a_coordinator(
    pki: Pki,  # noqa: F811
    serve_tls: Serve,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls = pki.tls_files()
    handler = Standby()
    standby = await serve_tls(pki.coordinator, generic=handler)
    leader = await serve_tls(pki.coordinator, workflows=Recorder("leader"))
    handler.leader = leader
    with Client(standby, tls=tls) as client:
        assert (await asyncio.to_thread(client.get, "wf-1")).name == "leader"
        assert client.target == leader and client.targets == (standby,)

    # A hint naming a server whose certificate the CA signed, but not as a coordinator.
    caplog.set_level(logging.WARNING, "plait.endpoints")
    fake = Recorder("impostor")
    handler.leader = await serve_tls(impostor(pki, tmp_path), workflows=fake)
    with Client(standby, tls=tls, max_hops=2) as client:
        client._sleep = lambda _s: None
        with pytest.raises(UnavailableError):
            await asyncio.to_thread(client.get, "wf-2")
        assert client.target == standby
    assert fake.metadata == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "plait.endpoints"]
    assert len(warnings) == 1  # once per address
    assert warnings[0].startswith(f"not following leader hint {handler.leader}: not in the")
    assert "is not a coordinator's" in warnings[0]


async def test_cli_tls_flags_before_and_after_the_command(
    pki: Pki,  # noqa: F811
    serve_tls: Serve,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PLAIT_TLS_CA", "PLAIT_TLS_CERT", "PLAIT_TLS_KEY", "PLAIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    recorder = Recorder("cli")
    address = await serve_tls(pki.coordinator, workflows=recorder, client_ca=pki.ca)
    pair = pki.user("reader")
    before = ["--tls-ca", pki.ca, "--tls-cert", pair.cert, "--tls-key", pair.key]
    argv = [*before, "--coordinator", address, "status", "wf-1", "-o", "json"]
    assert await asyncio.to_thread(main, argv) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli"
    argv = ["status", "wf-2", "-o", "json", "--coordinator", address, *before]
    assert await asyncio.to_thread(main, argv) == 0
    assert recorder.peers == ["user:reader", "user:reader"]
    # Without the client certificate the mTLS server refuses the handshake: unreachable.
    argv = ["--tls-ca", pki.ca, "--coordinator", address, "status", "wf-3"]
    assert await asyncio.to_thread(main, argv) == 3


# ---------------------------------------------------------------- the worker


async def test_worker_session_over_mtls(pki: Pki, serve_tls: Serve) -> None:  # noqa: F811
    coord = FakeCoordinator()
    address = await serve_tls(pki.coordinator, workers=coord, client_ca=pki.ca)
    pair = pki.worker("w1")
    config = SessionConfig(
        worker_id="w1",
        coordinator=address,
        slots=1,
        reconnect_initial=timedelta(milliseconds=20),
        reconnect_max=timedelta(milliseconds=200),
        tls=pki.tls_files(pair),
        token="plait_worker-token",
    )
    session = WorkerSession(config, [])
    task = asyncio.create_task(session.run())
    try:
        await coord.wait_for(lambda: coord.streams and coord.stream.of("heartbeat"))
        assert coord.stream.metadata["authorization"] == "Bearer plait_worker-token"
        assert session.connected
    finally:
        session.stop("test over")
        await asyncio.wait_for(task, 10)
