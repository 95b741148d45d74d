"""The plaintext health port (``--health-listen``): ``grpc.health.v1.Health/Check`` alone, for
probes that cannot speak TLS (server layer).

Kubernetes' native gRPC probes (``grpc:`` in a pod spec) dial the pod's IP without TLS and
present no identity, so they cannot reach the main port once it requires mutual TLS. This port
answers them from the coordinator's own health statuses, and nothing else:

* service ``""`` (and each ``plait.v1.*`` service) is SERVING only on the leader, after the
  journal is replayed; a standby answers NOT_SERVING. This is the readiness probe: a Service
  in front of several coordinators routes to the leader alone.
* service ``liveness`` (:data:`LIVENESS_SERVICE`) is SERVING from start-up until shutdown
  begins, on a standby too: the liveness probe, which must not restart a healthy standby or a
  leader in the middle of a long replay.

Only ``Check``: ``Watch`` (a stream held open for as long as the caller likes) answers
UNIMPLEMENTED, every other service too. There is no authentication and no TLS here by design:
what the port tells is whether this process leads, which any caller of the main port learns
anyway from a standby's ``NOT_LEADER`` refusal. Requests are bounded (4 KiB) and each
connection may hold few concurrent calls.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from plait.errors import ConfigError

__all__ = ["LIVENESS_SERVICE", "HealthPort"]

LIVENESS_SERVICE = "liveness"
_MAX_REQUEST_BYTES = 4096
_MAX_STREAMS = 8  # concurrent calls per connection; a probe makes one at a time


class _CheckOnly(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health has no stubs
    """The coordinator's health statuses, ``Check`` only (``Watch`` is UNIMPLEMENTED, as the
    generated base class answers)."""

    def __init__(self, health: HealthServicer) -> None:
        self._health = health

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        return await self._health.Check(request, context)


class HealthPort:
    """A second, plaintext gRPC server carrying :class:`_CheckOnly`."""

    def __init__(self, health: HealthServicer) -> None:
        self._health = health
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, listen: str, bind_problem: Any) -> int:
        """Serves on ``listen`` (``HOST:PORT``); returns the bound port.

        Raises:
            ConfigError: naming ``--health-listen`` and why it cannot be bound.
        """
        problem = bind_problem(listen, probe_only=True)
        if problem:
            raise ConfigError(f"--health-listen {listen}: {problem}")
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
                ("grpc.max_concurrent_streams", _MAX_STREAMS),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(_CheckOnly(self._health), server)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"--health-listen {listen}: {bind_problem(listen)}")
        await server.start()
        self._server = server
        self.port = port
        return port

    async def stop(self) -> None:
        """Stops answering (in-flight checks get a moment to finish)."""
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None
