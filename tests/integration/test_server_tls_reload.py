"""The coordinator follows its TLS files as they are renewed, without a restart.

A real coordinator serving mTLS on 127.0.0.1 from copies of its certificate and key; the test
replaces the files as cert-manager or an operator would and dials again. The "wrong host"
certificate (same CA, names only ``wrong.example``) shows which certificate a handshake got:
a new connection checking ``localhost`` fails once it is served, and works again once a good
one is back. Connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from tests.tlsfixtures import CertPair, Pki, pki  # noqa: F401  (pki: the session fixture)


def install(pair: CertPair, cert: Path, key: Path) -> None:
    """Replaces the served files as a Secret update does: new files renamed into place."""
    for src, dst in ((pair.cert, cert), (pair.key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


async def check(port: int, creds: grpc.ChannelCredentials) -> str:
    """A new connection's health Check: "ok", or the status code's name."""
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "ok"


async def started(certs: Pki, tmp_path: Path) -> tuple[Path, Path, CoordinatorServer]:
    """A coordinator serving mTLS (and HTTPS /metrics) from copies of its certificate and key:
    the copies' paths, and the server."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(certs.coordinator, cert, key)
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/journal.db",
            metrics_listen="127.0.0.1:0",
            tls_cert=str(cert),
            tls_key=str(key),
            tls_client_ca=certs.ca,
        )
    )
    await server.start()
    return cert, key, server


def served_pem(port: int) -> str:
    """The certificate an HTTPS listener serves now (no client certificate needed there)."""
    return ssl.get_server_certificate(("127.0.0.1", port))


def same_cert(pem: str, path: str) -> bool:
    """Whether ``pem`` is the first certificate of the chain file at ``path``."""
    first = Path(path).read_text().split("-----END CERTIFICATE-----")[0]
    return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(
        first + "-----END CERTIFICATE-----\n"
    )


@pytest.mark.timeout(60)
async def test_a_renewed_certificate_is_served_without_a_restart(
    pki: Pki,  # noqa: F811  (the session fixture)
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key, server = await started(pki, tmp_path)
    assert server.tls is not None
    worker = pki.worker("w1")
    creds = grpc.ssl_channel_credentials(
        Path(pki.ca).read_bytes(), Path(worker.key).read_bytes(), Path(worker.cert).read_bytes()
    )
    try:
        open_channel = grpc.aio.secure_channel(f"localhost:{server.port}", creds)
        stub = health_pb2_grpc.HealthStub(open_channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert await check(server.port, creds) == "ok"
        assert same_cert(served_pem(server.metrics_port), pki.coordinator.cert)

        # Renewed (here: with a certificate naming another host, so the handshake shows it).
        install(pki.wrong_host_coordinator, cert, key)
        assert await check(server.port, creds) == "UNAVAILABLE"  # the new one, refused by name
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # open: kept its own
        assert server.tls.check() is False  # the handshake took it already
        # The HTTPS listeners reloaded when the handshake took the change.
        assert same_cert(served_pem(server.metrics_port), pki.wrong_host_coordinator.cert)

        # Caught half-written: the good certificate with the wrong key. Kept the last good pair.
        with caplog.at_level(logging.WARNING, logger="plait.coordinator.server_tls"):
            tmp = cert.with_suffix(".new")
            shutil.copyfile(pki.coordinator.cert, tmp)
            os.replace(tmp, cert)
            assert server.tls.check() is False
        assert "cannot be used yet; keeping the old ones" in caplog.text
        assert await check(server.port, creds) == "UNAVAILABLE"  # still the wrong-host one

        # The key arrives: the pair loads together and is taken, by gRPC and by /metrics.
        install(pki.coordinator, cert, key)
        assert server.tls.check() is True
        assert await check(server.port, creds) == "ok"
        assert same_cert(served_pem(server.metrics_port), pki.coordinator.cert)
        await open_channel.close()
    finally:
        await server.stop(0)


async def test_the_metrics_listener_reloads_on_a_taken_change(
    pki: Pki,  # noqa: F811  (the session fixture)
    tmp_path: Path,
) -> None:
    cert, key, server = await started(pki, tmp_path)
    assert server.tls is not None
    try:
        install(pki.wrong_host_coordinator, cert, key)
        assert server.tls.check() is True  # what the periodic check does
        assert same_cert(served_pem(server.metrics_port), pki.wrong_host_coordinator.cert)
    finally:
        await server.stop(0)
