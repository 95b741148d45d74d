"""Stimuli: what can happen to the coordinator (pure core).

Each carries a ``cause`` (the stimulus id, kept on every history event it produces) and an
optional opaque ``reply`` token the runtime resolves once the resulting outcome is durable.
Time is not read by the core: it arrives with each batch as an :class:`Instant`.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.coordinator.core.model import Revocation
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb


@dataclass(frozen=True, slots=True)
class Instant:
    """The time a batch is handled: coordinator monotonic seconds and wall milliseconds."""

    monotonic: float
    wall_ms: int


@dataclass(frozen=True, slots=True)
class WorkflowSubmitted:
    """A client submitted a validated spec."""

    cause: str
    workflow_id: str
    spec: pb.WorkflowSpec
    idempotency_key: str
    reply: object = None
    traceparent: str = ""  # the submitter's W3C trace context (checked by the servicer)


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A client asked to cancel a workflow."""

    cause: str
    workflow_id: str
    reason: str
    reply: object = None


@dataclass(frozen=True, slots=True)
class RetryRequested:
    """A client asked to re-run what did not succeed."""

    cause: str
    workflow_id: str
    reply: object = None


@dataclass(frozen=True, slots=True)
class WorkerMessageReceived:
    """A message arrived on a worker's stream (the first one is always ``hello``)."""

    cause: str
    session_id: str
    message: wpb.ConnectRequest
    # For a hello only: the worker id the stream authenticated as (certificate or token; ""
    # when authentication is off), where it came from, and the new session's resume token.
    identity: str = ""
    peer: str = ""
    resume_token: str = ""


@dataclass(frozen=True, slots=True)
class WorkerStreamClosed:
    """A worker's stream ended (cleanly or not)."""

    cause: str
    session_id: str


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """An operator asked a worker to drain."""

    cause: str
    worker_id: str
    reply: object = None


@dataclass(frozen=True, slots=True)
class WorkerRevoked:
    """An operator revoked a worker id; the revocation is already durable in the store."""

    cause: str
    worker_id: str
    revocation: Revocation
    reply: object = None


@dataclass(frozen=True, slots=True)
class WorkerReinstated:
    """An operator reinstated a revoked worker id (already removed from the store)."""

    cause: str
    worker_id: str
    reply: object = None


@dataclass(frozen=True, slots=True)
class TimePassed:
    """Periodic stimulus: expire leases, fire timeouts, end backoffs."""

    cause: str


Stimulus = (
    WorkflowSubmitted
    | CancelRequested
    | RetryRequested
    | WorkerMessageReceived
    | WorkerStreamClosed
    | DrainRequested
    | WorkerRevoked
    | WorkerReinstated
    | TimePassed
)
