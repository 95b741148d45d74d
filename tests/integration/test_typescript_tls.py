"""The TypeScript worker over mTLS with a bearer token (issue 12: the SDK's TLS options).

A fake coordinator (tests.integration.worker_session_support) serves WorkerService over TLS and
requires a client certificate from the test CA; the TypeScript example worker
(``clients/typescript/dist/examples/worker.js``) reads its CA, certificate, key and token from
``PLAIT_TLS_*`` / ``PLAIT_TOKEN``, as the Python SDK does. The worker must complete the TLS
handshake with its certificate, send the token, say hello and heartbeat.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from plait.v1 import worker_service_pb2_grpc as wpb_grpc
from tests.conformance.workers import KNOWN
from tests.integration.worker_session_support import FakeCoordinator
from tests.tlsfixtures import Pki, pki  # noqa: F401

TYPESCRIPT = next(impl for impl in KNOWN if impl.name == "typescript")


@pytest.fixture
async def fake_over_mtls(pki: Pki) -> AsyncIterator[tuple[FakeCoordinator, str]]:  # noqa: F811
    coord = FakeCoordinator()
    server = grpc.aio.server()
    wpb_grpc.add_WorkerServiceServicer_to_server(coord, server)
    key, cert = pki.coordinator.pem()
    ca = Path(pki.ca).read_bytes()
    creds = grpc.ssl_server_credentials([(key, cert)], ca, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield coord, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_typescript_worker_over_mtls_with_a_token(
    pki: Pki,  # noqa: F811
    fake_over_mtls: tuple[FakeCoordinator, str],
) -> None:
    TYPESCRIPT.require()  # skips without a built TypeScript worker; fails under CI
    coord, address = fake_over_mtls
    pair = pki.worker("w1")
    env = dict(
        os.environ,
        PLAIT_TLS_CA=pki.ca,
        PLAIT_TLS_CERT=pair.cert,
        PLAIT_TLS_KEY=pair.key,
        PLAIT_TOKEN="plait_worker-token",
    )
    argv = TYPESCRIPT.argv(coordinator=address, worker_id="w1", slots=1)
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await coord.wait_for(lambda: coord.streams and coord.stream.of("hello"), 20)
        assert coord.stream.metadata["authorization"] == "Bearer plait_worker-token"
        assert coord.stream.of("hello")[0].worker_id == "w1"
        await coord.wait_for(lambda: coord.stream.of("heartbeat"), 20)  # welcomed, heartbeating
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode(errors="replace")
