"""WorkerSession and the trust boundary: the resume token, the bearer token, refused reports,
and streams refused because another session holds the worker id (or replaced by a newer one).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from plait.v1 import worker_service_pb2 as pb
from plait.worker import SessionConfig, WorkerSession
from tests.integration.worker_session_support import (
    FAILED_PRECONDITION,
    Harness,
    connected,
    handler_lease,
)


async def test_resume_token_goes_back_in_every_reconnect_hello(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h.start_session()
    first = await connected(h)
    assert first.hello is not None and first.hello.resume_token == ""  # a first connect
    first.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.hello)
    second = h.coord.stream
    assert second.hello is not None and second.hello.resume_token == "resume-1"
    await connected(h)
    second.end()
    await h.coord.wait_for(lambda: len(h.coord.streams) == 3 and h.coord.stream.hello)
    third = h.coord.stream
    # The latest Welcome's token, not the first one's.
    assert third.hello is not None and third.hello.resume_token == "resume-2"
    assert "resume-" not in caplog.text  # a secret: never logged


async def test_bearer_token_rides_on_connect(h: Harness) -> None:
    h.start_session(token="plait_test-token")
    stream = await connected(h)
    assert stream.metadata.get("authorization") == "Bearer plait_test-token"


async def test_no_authorization_without_a_token(h: Harness) -> None:
    h.start_session()
    stream = await connected(h)
    assert "authorization" not in stream.metadata


async def test_refused_start_kills_the_attempt(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "plait.worker.session")
    session = h.start_session()
    stream = await connected(h)
    stream.grant(handler_lease("blocked", "b1", token=5), handler_lease("blocked", "b2", token=6))
    await h.coord.wait_for(lambda: len(stream.of("action_started")) >= 1)
    await h.coord.wait_for(lambda: sorted(session.running) == ["b1", "b2"])
    refusal = pb.ResultAck(lease_id="b1", fencing_token=5)
    refusal.status.code = FAILED_PRECONDITION
    refusal.status.message = "lease b1 is held by another session of worker w1"
    # A refusal of another token of b2 is not about this attempt.
    other = pb.ResultAck(lease_id="b2", fencing_token=99)
    other.status.code = FAILED_PRECONDITION
    stream.send(ack=pb.Ack(refused=[refusal, other]))
    await h.coord.wait_for(lambda: session.running == ["b2"])
    result = await h.coord.wait_for(lambda: next(iter(stream.results), None))
    assert (result.lease_id, result.outcome) == ("b1", pb.ACTION_OUTCOME_CANCELLED)
    assert "refused by the coordinator" in result.error.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "lease b1 (token 5) refused by the coordinator: lease b1 is held by another session" in m
        for m in warnings
    )
    # The refused result is forgotten like any other refused one.
    await h.coord.wait_for(lambda: not session.unacked)


async def test_already_connected_elsewhere_is_an_error_and_retried(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "plait.worker.session")
    h.coord.refuse_connects = 2
    session = h.start_session()
    await connected(h)
    assert h.coord.refused_connects == 2 and session.stats.connects == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert errors[0].startswith("worker id w1 is already connected from another session;")


async def test_a_replaced_session_reconnects(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "plait.worker.session")
    session = h.start_session()
    first = await connected(h)
    first.abort(grpc.StatusCode.ABORTED, "replaced by session s2")
    await h.coord.wait_for(lambda: len(h.coord.streams) == 2 and h.coord.stream.of("heartbeat"))
    assert session.stats.connects == 2
    assert any("replaced this session of worker w1" in r.getMessage() for r in caplog.records)


async def test_a_refused_worker_logs_the_coordinators_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real coordinator with tokens refuses an unknown token in its interceptor; the worker
    # waits to be accepted before writing Hello, so it always sees UNAUTHENTICATED and the
    # reason, never gRPC's INTERNAL for a call ended under a write.
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        token_file_text([TokenEntry("w1", frozenset({Role.WORKER}), hash_token(new_token()))])
    )
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/j.db",
            metrics_listen=None,
            auth_tokens=str(tokens),
        )
    )
    await server.start()
    caplog.set_level(logging.INFO, "plait.worker")
    config = SessionConfig(
        worker_id="w1",
        coordinator=f"127.0.0.1:{server.port}",
        slots=1,
        reconnect_initial=timedelta(milliseconds=10),
        reconnect_max=timedelta(milliseconds=20),
        token=new_token(),  # not in the file
    )
    refusals = RefusalCounter(20)
    logging.getLogger("plait.worker").addHandler(refusals)
    session = WorkerSession(config, [])
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(refusals.enough.wait(), 30)
        assert "INTERNAL" not in caplog.text
        assert "UNAUTHENTICATED" in caplog.text
    finally:
        logging.getLogger("plait.worker").removeHandler(refusals)
        session.stop("test over")
        await asyncio.wait_for(task, 10)
        await server.stop(0)


class RefusalCounter(logging.Handler):
    """Sets ``enough`` once ``n`` records have said the token was refused."""

    def __init__(self, n: int) -> None:
        super().__init__(logging.INFO)
        self.n = n
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "bearer token is not valid" in record.getMessage():
            self.n -= 1
            if self.n <= 0:
                self.enough.set()


async def test_an_older_coordinator_without_early_metadata_still_welcomes(h: Harness) -> None:
    h.coord.early_metadata = False  # nothing before Welcome: the wait gives up after a second
    h.start_session()
    stream = await connected(h)
    assert stream.hello is not None and stream.hello.worker_id
