from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from plait.coordinator.config import CoordinatorConfig
from plait.coordinator.server import CoordinatorServer
from tests.integration.worker_session_support import Harness


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    """A real coordinator (grpc.aio on 127.0.0.1:0, SQLite file) in this process."""
    server = CoordinatorServer(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            store=f"sqlite:///{tmp_path}/journal.db",
            metrics_listen="127.0.0.1:0",
            heartbeat_interval=timedelta(milliseconds=100),
            lease_ttl=timedelta(milliseconds=600),
            kill_grace=timedelta(milliseconds=100),
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    """A WorkerSession harness: the in-test coordinator's server started, no session yet."""
    harness = Harness(tmp_path)
    await harness.start_server()
    try:
        yield harness
    finally:
        await harness.close()
