"""TLS and mutual TLS against real coordinators: what fails, how, and what each side says.

Where the TLS handshake fails, no RPC exists yet: the coordinator's Python code (and its log)
sees nothing, and only gRPC's C core logs the reason, to stderr (``ssl_transport_security.cc``
lines, captured here with ``capfd``). Refusals after the handshake are Plait statuses, logged by
the coordinator's error interceptor at DEBUG (``refused: ...``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.security import (
    Role,
    TlsFiles,
    TokenEntry,
    channel_credentials,
    channel_options_for,
    hash_token,
    new_token,
    token_file_text,
)
from plait.v1 import admin_service_pb2 as apb
from plait.v1 import admin_service_pb2_grpc as agrpc
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import worker_service_pb2_grpc as wgrpc
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb
from plait.v1 import workflow_service_pb2_grpc as wsgrpc
from tests.integration.protocol_worker import ProtocolWorker
from tests.tlsfixtures import Pki, pki  # noqa: F401  (pki: the session fixture)

pytestmark = pytest.mark.timeout(60)
in_module_loop = pytest.mark.asyncio(loop_scope="module")

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ERRORS_LOGGER = "plait.coordinator.services.errors"
# gRPC core logs handshake failures at INFO; GRPC_VERBOSITY=ERROR (or NONE) silences them.
CORE_LOGS_INFO = os.environ.get("GRPC_VERBOSITY", "").upper() in ("", "DEBUG", "INFO")


@dataclass
class Served:
    """A running coordinator and the methods its authenticator has been asked about."""

    server: CoordinatorServer
    seen: list[str]

    @property
    def port(self) -> int:
        return self.server.port


@dataclass
class Coordinators:
    mtls: Served  # client CA + tokens; /metrics on
    tls_tokens: Served  # TLS + tokens, no client CA
    wrong_host: Served  # certificate for wrong.example only
    untrusted: Served  # certificate signed by a CA clients do not trust
    worker_token: str  # a token with role worker, name w1


async def _start(cfg: CoordinatorConfig) -> Served:
    server = CoordinatorServer(cfg)
    await server.start()
    seen: list[str] = []
    authenticate = server.authenticator.authenticate

    def counting(method: str, context: Any) -> Any:
        seen.append(method)
        return authenticate(method, context)

    server.authenticator.authenticate = counting  # type: ignore[method-assign]
    return Served(server, seen)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coords(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Coordinators]:  # noqa: F811
    d: Path = tmp_path_factory.mktemp("mtls")
    worker_token = new_token()
    (d / "tokens.toml").write_text(
        token_file_text([TokenEntry("w1", frozenset({Role.WORKER}), hash_token(worker_token))])
    )

    def config(name: str, cert: str, key: str, **kw: Any) -> CoordinatorConfig:
        kw.setdefault("metrics_listen", None)
        return CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{d}/{name}.db",
            heartbeat_interval=timedelta(milliseconds=200),
            lease_ttl=timedelta(seconds=3),
            kill_grace=timedelta(milliseconds=200),
            tls_cert=cert,
            tls_key=key,
            **kw,
        )

    c, w = pki.coordinator, pki.wrong_host_coordinator
    started: list[Served] = []
    try:
        for cfg in (
            config(
                "mtls",
                c.cert,
                c.key,
                tls_client_ca=pki.ca,
                auth_tokens=str(d / "tokens.toml"),
                metrics_listen="127.0.0.1:0",
            ),
            config("tls-tokens", c.cert, c.key, auth_tokens=str(d / "tokens.toml")),
            config("wrong-host", w.cert, w.key),
            config("untrusted", pki.untrusted_coordinator.cert, pki.untrusted_coordinator.key),
        ):
            started.append(await _start(cfg))
        yield Coordinators(*started, worker_token=worker_token)
    finally:
        for s in started:
            await s.server.stop(0)


async def list_workers(
    target: str, tls: TlsFiles | None, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError | apb.ListWorkersResponse:
    """ListWorkers over TLS (``tls``) or plaintext (None): the answer, or the error."""
    if tls is None:
        ch = grpc.aio.insecure_channel(target)
    else:
        ch = grpc.aio.secure_channel(
            target, channel_credentials(tls), options=channel_options_for(tls)
        )
    async with ch:
        try:
            return await agrpc.AdminServiceStub(ch).ListWorkers(
                apb.ListWorkersRequest(), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e


async def connect(
    target: str, tls: TlsFiles, worker_id: str, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError | wpb.ConnectResponse:
    """Opens WorkerService.Connect, says hello as ``worker_id``: the first answer, or the error.

    gRPC may replace the status of a bidirectional call the server ends while the client is
    still sending by INTERNAL "Internal error from Core"; then the call is made again.
    """
    hello = wpb.ConnectRequest(hello=wpb.Hello(worker_id=worker_id, slots=1, handlers=["x"]))
    async with grpc.aio.secure_channel(target, channel_credentials(tls)) as ch:
        for _ in range(5):
            call = wgrpc.WorkerServiceStub(ch).Connect(metadata=metadata, timeout=10)
            try:
                await call.write(hello)
                first: wpb.ConnectResponse = await call.read()
                return first
            except grpc.aio.AioRpcError as e:
                lost = e.code() == grpc.StatusCode.INTERNAL
                if not (lost and e.details() == "Internal error from Core"):
                    return e
            finally:
                call.cancel()
    raise AssertionError("the status of Connect was lost 5 times in a row")


def refused(result: object) -> grpc.aio.AioRpcError:
    assert isinstance(result, grpc.aio.AioRpcError), f"expected a refusal, got {result}"
    return result


async def core_log(capfd: pytest.CaptureFixture[str], *needles: str) -> str:
    """What gRPC's C core wrote to stderr, once it contains every needle (or after 3 s)."""
    text = ""
    for _ in range(60):
        text += capfd.readouterr().err
        if all(n in text for n in needles):
            break
        await asyncio.sleep(0.05)
    return text


async def assert_core_logged(capfd: pytest.CaptureFixture[str], *needles: str) -> None:
    """The server's side of a failed handshake: only gRPC core says why, on stderr."""
    if not CORE_LOGS_INFO:
        return  # GRPC_VERBOSITY hides the INFO line; the client-side assertions still hold
    text = await core_log(capfd, *needles)
    for n in needles:
        assert n in text, f"gRPC core did not log {n!r}; stderr was:\n{text}"


# -- handshake failures ---------------------------------------------------------------------


@in_module_loop
async def test_plaintext_client_to_tls_port(
    coords: Coordinators, capfd: pytest.CaptureFixture[str]
) -> None:
    before = len(coords.mtls.seen)
    e = refused(await list_workers(f"127.0.0.1:{coords.mtls.port}", None))
    assert e.code() == UNAVAILABLE
    # The client only learns that the server closed the connection.
    assert "Socket closed" in (e.details() or "")
    # The server's TLS layer got an HTTP/2 preface instead of a ClientHello.
    await assert_core_logged(capfd, "Handshake failed", "WRONG_VERSION_NUMBER")
    assert coords.mtls.seen[before:] == []


@in_module_loop
async def test_client_trusting_the_wrong_ca_refuses_the_coordinator(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
    capfd: pytest.CaptureFixture[str],
) -> None:
    before = len(coords.mtls.seen)
    tls = pki.tls_files(pki.user("reader"), ca=pki.untrusted_ca)
    e = refused(await list_workers(f"localhost:{coords.mtls.port}", tls))
    assert e.code() == UNAVAILABLE
    details = e.details() or ""
    assert "Tls handshake failed" in details
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in details
    # This core line is the client's own (checked with client and coordinator in separate
    # processes): the coordinator's side logs nothing when a client aborts the handshake.
    await assert_core_logged(capfd, "Handshake failed", "CERTIFICATE_VERIFY_FAILED")
    assert coords.mtls.seen[before:] == []


@in_module_loop
async def test_coordinator_signed_by_an_untrusted_ca_is_refused(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
) -> None:
    # Same names (plait://coordinator/coord, localhost), another CA: trust is the signature.
    e = refused(await list_workers(f"localhost:{coords.untrusted.port}", pki.tls_files()))
    assert e.code() == UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in (
        e.details() or ""
    )
    assert coords.untrusted.seen == []


@pytest.mark.parametrize(
    ("which", "server_says"),
    [
        ("none", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("untrusted", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
)
@in_module_loop
async def test_client_certificate_refused_by_the_coordinator(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
    capfd: pytest.CaptureFixture[str],
    which: str,
    server_says: str,
) -> None:
    """The coordinator rejects the client's certificate during the handshake (TLS 1.3).

    The core lines asserted here are the coordinator's: only the server verifies a client
    certificate, and a plaintext client has no TLS layer to log anything."""
    pair = {"none": None, "untrusted": pki.untrusted_operator, "expired": pki.expired}[which]
    before = len(coords.mtls.seen)
    e = refused(await list_workers(f"localhost:{coords.mtls.port}", pki.tls_files(pair)))
    assert e.code() == UNAVAILABLE
    # With TLS 1.3 the client has finished its side when the server refuses its certificate:
    # all the client sees is the connection closing. The reason is on the server's side only.
    assert "Socket closed" in (e.details() or "")
    await assert_core_logged(capfd, "Handshake failed", server_says)
    assert coords.mtls.seen[before:] == []


@in_module_loop
async def test_hostname_mismatch(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A coordinator whose certificate names wrong.example only, dialled as localhost."""
    port = coords.wrong_host.port
    e = refused(await list_workers(f"localhost:{port}", pki.tls_files()))
    assert e.code() == UNAVAILABLE
    details = e.details() or ""
    assert "Hostname Verification Check failed" in details, details
    # The client's gRPC core says which name it looked for; the coordinator logs nothing.
    await assert_core_logged(capfd, "No match found for server name: localhost")
    assert coords.wrong_host.seen == []
    # Dialling with the name the certificate does list works (--tls-server-name).
    tls = TlsFiles(pki.ca, server_name="wrong.example")
    ok = await list_workers(f"localhost:{port}", tls)
    assert isinstance(ok, apb.ListWorkersResponse)


# -- refusals after the handshake -----------------------------------------------------------


@in_module_loop
async def test_worker_certificate_of_another_worker(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ERRORS_LOGGER)
    tls = pki.tls_files(pki.worker("w2"))
    e = refused(await connect(f"localhost:{coords.mtls.port}", tls, "w1"))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    message = (
        "hello.worker_id 'w1' does not match the caller's identity:"
        " worker:w2 (certificate; roles worker) proves worker 'w2'"
    )
    assert e.details() == message
    assert f"refused: {message}" in caplog.messages
    # A worker token of w1 next to the certificate does not change who the stream is.
    md = (("authorization", f"Bearer {coords.worker_token}"),)
    e = refused(await connect(f"localhost:{coords.mtls.port}", tls, "w1", md))
    assert e.details() == message


@in_module_loop
async def test_worker_service_needs_a_client_certificate(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a TLS port without a client CA no certificate is asked for, so no worker can connect,
    not even with a valid worker token."""
    caplog.set_level(logging.DEBUG, logger=ERRORS_LOGGER)
    target = f"localhost:{coords.tls_tokens.port}"
    message = (
        "/plait.v1.WorkerService/Connect requires a client certificate"
        " (plait://worker/<id>, OU=worker); this coordinator has no --tls-client-ca"
    )
    md = (("authorization", f"Bearer {coords.worker_token}"),)
    for tls, metadata in (
        (pki.tls_files(), ()),
        (pki.tls_files(), md),
        (pki.tls_files(pki.worker("w1")), ()),  # held, but never requested, so never sent
    ):
        e = refused(await connect(target, tls, "w1", metadata))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        assert e.details() == message
    assert f"refused: {message}" in caplog.messages
    assert coords.worker_token not in caplog.text


# -- what works -----------------------------------------------------------------------------


@in_module_loop
async def test_worker_and_users_over_mtls(pki: Pki, coords: Coordinators) -> None:  # noqa: F811
    """w1 connects as w1, the operator submits, w1 runs it, the reader sees it succeed."""
    target = f"localhost:{coords.mtls.port}"
    w = ProtocolWorker(target, "w1", slots=1)
    await w.channel.close()
    w.channel = grpc.aio.secure_channel(
        target, channel_credentials(pki.tls_files(pki.worker("w1")))
    )
    try:
        welcome = await w.connect()
        assert welcome.heartbeat_interval.ToMilliseconds() == 200
        spec = pb.WorkflowSpec(name="one")
        spec.actions.add(id="a", handler="noop")
        operator = channel_credentials(pki.tls_files(pki.user("operator")))
        async with grpc.aio.secure_channel(target, operator) as ch:
            resp = await wsgrpc.WorkflowServiceStub(ch).SubmitWorkflow(
                wspb.SubmitWorkflowRequest(spec=spec), timeout=10
            )
        assert resp.created and resp.workflow_id
        (lease,) = await w.grants(1)
        assert lease.action_id == "a"
        w.finish(lease, '{"ok": true}')
        ack = await w.next("ack")
        assert ack.ack.results[0].status.code == 0
        reader = channel_credentials(pki.tls_files(pki.user("reader")))
        async with grpc.aio.secure_channel(target, reader) as ch:
            got = await wsgrpc.WorkflowServiceStub(ch).GetWorkflow(
                wspb.GetWorkflowRequest(workflow_id=resp.workflow_id), timeout=10
            )
        assert got.workflow.state == pb.WORKFLOW_STATE_SUCCEEDED
        # The coordinator knows the worker by the identity its certificate proved.
        async with grpc.aio.secure_channel(target, reader) as ch:
            workers = await agrpc.AdminServiceStub(ch).ListWorkers(
                apb.ListWorkersRequest(), timeout=10
            )
        assert [x.worker_id for x in workers.workers] == ["w1"]
    finally:
        await w.close()


@in_module_loop
async def test_metrics_served_over_https_with_the_coordinator_certificate(
    pki: Pki,  # noqa: F811
    coords: Coordinators,
) -> None:
    port = coords.mtls.server.metrics_port
    assert port
    ctx = ssl.create_default_context(cafile=pki.ca)

    def scrape() -> bytes:
        with urllib.request.urlopen(
            f"https://localhost:{port}/metrics", context=ctx, timeout=10
        ) as r:
            body: bytes = r.read()
        return body

    body = await asyncio.to_thread(scrape)
    assert b"plait_workflows_submitted_total" in body
    # The certificate served there is the gRPC port's (verified against the CA on the way).
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("localhost", port), ca_certs=pki.ca)
    assert ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(
        Path(pki.coordinator.cert).read_text()
    )
    # No client certificate is needed there, and plaintext HTTP gets no metrics.

    def plaintext() -> BaseException | bytes:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10) as r:
                data: bytes = r.read()
                return data
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            return e

    assert not isinstance(await asyncio.to_thread(plaintext), bytes)
    # A scraper that trusts another CA refuses the endpoint.
    wrong = ssl.create_default_context(cafile=pki.untrusted_ca)

    def untrusted() -> BaseException | None:
        try:
            urllib.request.urlopen(f"https://localhost:{port}/metrics", context=wrong, timeout=10)
        except urllib.error.URLError as e:
            return e.reason if isinstance(e.reason, BaseException) else e
        return None

    err = await asyncio.to_thread(untrusted)
    assert isinstance(err, ssl.SSLCertVerificationError), err
