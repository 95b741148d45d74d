"""Records the pure core keeps in memory, and the :class:`Outcome` it returns (pure core).

A workflow owns its actions; an action holds at most one live lease; a worker holds the leases
granted to it. Nothing here does I/O: stimuli come in (``core.events``), records, messages and
replies go out in an :class:`Outcome` that the runtime journals first and delivers second.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from google.rpc import status_pb2

from plait.coordinator.core.transitions import PENDING, STATE_NAME
from plait.hlc import ZERO, HlcTimestamp
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

RUNNING_WF = pb.WorkflowState.WORKFLOW_STATE_RUNNING


@dataclass(slots=True, eq=False)
class ActionRecord:
    """One node of a workflow's DAG and its lifecycle."""

    workflow: WorkflowRecord
    spec: pb.ActionSpec
    _state: int = PENDING  # read and set as `state` (which keeps its workflow's counts)
    attempt: int = 0
    token: int = 0  # highest fencing token granted; only grows
    failures: int = 0  # failed attempts (the retry budget)
    lease_losses: int = 0  # lost leases (their own budget)
    unmet: int = 0  # needs (or map children) not yet succeeded
    failed_needs: int = 0  # needs (or map children) that ended without success
    needs: list[ActionRecord] = field(default_factory=list)
    dependents: list[ActionRecord] = field(default_factory=list)
    lease: LeaseRecord | None = None
    hedge: LeaseRecord | None = None  # a second live lease (speculation)
    worker_id: str = ""
    # Committed outputs (core.outputs): the text when small; else the sequence of the journal
    # event holding them (outputs_ref), or, for a map or pipeline, the children they collect.
    outputs_json: str = ""
    outputs_ref: int = 0
    outputs_bytes: int = 0  # UTF-8 size, however they are kept
    outputs_items: list[ActionRecord | None] | None = None
    committed_token: int = 0  # token of the result that committed, 0 if none did
    error: status_pb2.Status | None = None
    exit_code: int = 0
    reason: str = ""
    reason_code: int = 0  # EventReason of its terminal event (the typed meaning of `reason`)
    slots: int = 1
    not_before: float = 0.0  # monotonic; retry backoff
    ready_at: float = 0.0  # monotonic: when it last became ready to run (after any backoff)
    queued: bool = False  # in its workflow's ready queue (dispatch takes it from there)
    ready_seq: int = 0  # sequence of the event it last became READY at (its timers' identity)
    parent: ActionRecord | None = None  # the map action that made this child
    children: list[ActionRecord] | None = None  # a map action's children, once expanded
    running_children: int = 0  # a map action's children holding leases
    item_json: str = ""  # a map child's item
    priority: int = 0
    lost_by: str = ""  # worker id that last lost a lease of it (leased elsewhere if it can be)
    stage: int = -1  # a pipeline stage action's position in its chain
    first: ActionRecord | None = None  # a pipeline stage action's item's first stage
    opened: bool = False  # a first stage whose item entered the pipeline (was leased)
    last_stage: bool = False  # a pipeline stage action that ends its item's chain
    in_flight: int = 0  # a pipeline's items between first-stage start and last-stage end
    holders: dict[int, str] | None = None  # fencing token -> worker id it was granted to
    # Coordinator wall times (ms, display only, from the events' recorded_at): the current or
    # last attempt's start (a map's: its mapping), and the terminal event; 0 when not yet.
    started_wall_ms: int = 0
    finished_wall_ms: int = 0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def key(self) -> str:
        return f"{self.workflow.workflow_id}/{self.spec.id}"

    @property
    def state(self) -> int:
        """Its ActionState. Moved only through the transition table (``set_state``); each move
        updates its workflow's :attr:`WorkflowRecord.moved`, so status counts are never
        recounted."""
        return self._state

    @state.setter
    def state(self, new: int) -> None:
        moved = self.workflow.moved
        moved[self._state] -= 1
        moved[new] += 1
        self._state = new


@dataclass(slots=True, eq=False)
class WorkflowRecord:
    """A submitted workflow."""

    workflow_id: str
    spec: pb.WorkflowSpec
    idempotency_key: str
    submitted_wall_ms: int
    submitted_hlc: HlcTimestamp
    actions: dict[str, ActionRecord] = field(default_factory=dict)
    ready: deque[ActionRecord] = field(default_factory=deque)
    state: int = RUNNING_WF
    remaining: int = 0  # actions not yet terminal
    cancel_requested: bool = False
    failing: str = ""  # why the workflow is being ended early (fail_fast, deadline)
    run_seq: int = 0  # sequence of its submission or last retry (its deadline's identity)
    leased: int = 0  # actions of this workflow holding leases (max_parallel)
    finished_wall_ms: int = 0
    finished_hlc: HlcTimestamp = ZERO
    reason: str = ""
    traceparent: str = ""  # the submitter's W3C trace context, if it gave one
    # Net moves of its actions into each ActionState (by number) since each was made (PENDING);
    # with len(actions) they give counts() in O(1), which ListWorkflows may poll.
    moved: list[int] = field(default_factory=lambda: [0] * (max(STATE_NAME) + 1))

    def counts(self) -> dict[int, int]:
        """How many of its actions are in each ActionState (states with none left out)."""
        out = {s: n for s, n in enumerate(self.moved) if n and s != PENDING}
        pending = len(self.actions) + self.moved[PENDING]
        if pending:
            out[PENDING] = pending
        return out


@dataclass(slots=True, eq=False)
class LeaseRecord:
    """The right of one worker to run one attempt."""

    lease_id: str
    action: ActionRecord
    worker: WorkerRecord
    token: int
    attempt: int
    grant_seq: int  # LeaseGrant.sequence on the worker's session (0: adopted)
    granted_at: float  # coordinator monotonic
    slots: int
    started: bool = False
    last_progress: float = 0.0  # coordinator monotonic time of the last progress report
    reclaiming: bool = False  # asked back (CANCEL_REASON_RECLAIMED) while queued unstarted


@dataclass(slots=True, eq=False)
class WorkerRecord:
    """A worker daemon, connected or recently gone (while it still holds leases)."""

    worker_id: str
    session_id: str
    hello: wpb.Hello
    labels: dict[str, str]
    handlers: frozenset[str]
    exec_enabled: bool
    slots: int
    free: int
    connected_at_wall_ms: int
    last_renewed: float  # monotonic: last heartbeat (renews every lease)
    last_seen: float
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)  # offered
    used: dict[str, float] = field(default_factory=dict)  # held by its leases
    connected: bool = True
    draining: bool = False
    said_goodbye: bool = False
    grant_seq: int = 0
    clock_rejections: int = 0
    last_hlc: HlcTimestamp = ZERO
    resume_token: str = ""  # Welcome.resume_token of its live session (proves a reconnect)
    identity: str = ""  # principal the session authenticated as ("" when auth is off)
    # Proof that the worker hears this session (core.liveness): when the Welcome went out,
    # the recent heartbeat acks (sequence, monotonic time sent), and the newest time echoed.
    reported_free: int = 0  # Heartbeat.free_slots: free by the worker's own count
    welcomed_at: float = -math.inf
    acks: list[tuple[int, float]] = field(default_factory=list)
    proof_at: float = -math.inf
    # Prefetch (core.prefetch): Welcome.prefetch, the depth granted now (both in slots beyond
    # the free ones), and the mean run time of its recent attempts (seconds; < 0: none yet).
    prefetch: int = 0
    depth: int = 0
    mean_run: float = -1.0


@dataclass(frozen=True, slots=True)
class Revocation:
    """Why, by whom and when a worker id was revoked (kept as JSON text in the store)."""

    reason: str
    revoked_by: str
    at_wall_ms: int

    def refusal(self, worker_id: str) -> str:
        """The message a revoked worker's stream (and every later Hello) is refused with."""
        why = f": {self.reason}" if self.reason else ""
        return (
            f"worker {worker_id!r} is revoked (by {self.revoked_by or 'an operator'}{why}); an"
            f" operator may `plait reinstate {worker_id}`"
        )

    def to_json(self) -> str:
        """The record as the store keeps it."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Revocation:
        """The record from the store (missing fields default, so old records still load)."""
        raw = json.loads(text or "{}")
        return cls(
            str(raw.get("reason", "")),
            str(raw.get("revoked_by", "")),
            int(raw.get("at_wall_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The coordinator ends a worker's stream with this status (``code`` a google.rpc code)."""

    session_id: str
    code: int
    message: str
    field: str = ""  # for INVALID_ARGUMENT: the request field at fault


ObservationKind = Literal[
    "action_duration",
    "clock_offset",
    "hello_refused",
    "lease_lost",
    "report_refused",
    "stale_result",
    "worker_connected",
    "worker_disconnected",
    "workflow_finished",
]
"""Every kind of :class:`Observation` (a typo is a type error, not a silently lost metric)."""


@dataclass(slots=True)
class Observation:
    """Something metrics or logs should know; the core does not touch either itself."""

    kind: ObservationKind
    worker_id: str = ""
    value: float = 0.0
    detail: str = ""
    lease_id: str = ""
    reason: int = 0  # an EventReason, where one applies (lease_lost)


# What a lease costs in a grant message beyond its inputs and spec (ids, ttl, traceparent).
LEASE_OVERHEAD_BYTES = 1024


class Outcome:
    """What one batch of stimuli produced: journal first, then deliver.

    ``grant_bytes``: how many bytes of leases one LeaseGrant message may carry (so that it
    fits the gRPC message limit; one lease alone may use all of it).
    """

    __slots__ = (
        "_acks",
        "_grant_bytes",
        "_grants",
        "closes",
        "grant_bytes",
        "logs",
        "observations",
        "records",
        "replies",
        "sends",
    )

    def __init__(self, grant_bytes: int = 1 << 62) -> None:
        self.records: list[pb.HistoryEvent] = []
        self.sends: dict[str, list[wpb.ConnectResponse]] = {}
        self.replies: list[tuple[object, object]] = []
        self.observations: list[Observation] = []
        self.closes: list[SessionEnd] = []
        self.logs: list[KeepLogs] = []  # live logs: kept in memory, never journalled
        self.grant_bytes = grant_bytes
        self._grants: dict[str, wpb.LeaseGrant] = {}
        self._grant_bytes: dict[str, int] = {}
        self._acks: dict[str, wpb.Ack] = {}

    def send(self, session_id: str, msg: wpb.ConnectResponse) -> None:
        """Queues a message for a worker's stream."""
        self.sends.setdefault(session_id, []).append(msg)

    def grant(self, w: WorkerRecord, lease_bytes: int) -> wpb.LeaseGrant:
        """The LeaseGrant a lease of ``lease_bytes`` for ``w`` goes in: one per session in this
        outcome, and another, with the session's next grant sequence, whenever the open one
        would pass ``grant_bytes``."""
        session_id = w.session_id
        size = lease_bytes + LEASE_OVERHEAD_BYTES
        g = self._grants.get(session_id)
        if g is not None:
            used = self._grant_bytes[session_id] + size
            if used <= self.grant_bytes:
                self._grant_bytes[session_id] = used
                return g
        w.grant_seq += 1
        msg = wpb.ConnectResponse()
        msg.lease_grant.sequence = w.grant_seq
        g = msg.lease_grant
        self._grants[session_id] = g
        self._grant_bytes[session_id] = size
        self.send(session_id, msg)
        return g

    def ack(self, session_id: str) -> wpb.Ack:
        """The Ack for a session in this outcome (one per session)."""
        a = self._acks.get(session_id)
        if a is None:
            msg = wpb.ConnectResponse()
            a = msg.ack
            a.SetInParent()
            self._acks[session_id] = a
            self.send(session_id, msg)
        return a

    def cancel(self, session_id: str, lease: LeaseRecord, reason: int, message: str) -> None:
        """Queues a CancelLease for one lease."""
        msg = wpb.ConnectResponse()
        msg.cancel_lease.leases.add(
            lease_id=lease.lease_id,
            fencing_token=lease.token,
            reason=reason,
            message=message,
        )
        self.send(session_id, msg)

    def close(self, session_id: str, code: int, message: str, field: str = "") -> None:
        """Ends a worker's stream, after this outcome's messages, with ``code`` and ``message``
        (``field``: the request field at fault, for INVALID_ARGUMENT)."""
        self.closes.append(SessionEnd(session_id, code, message, field))

    def reply(self, token: object, value: object) -> None:
        """Answers an RPC once the journal has committed this outcome."""
        if token is not None:
            self.replies.append((token, value))

    def observe(self, kind: ObservationKind, **kw: object) -> None:
        """Records an observation for metrics or logs."""
        self.observations.append(Observation(kind, **kw))  # type: ignore[arg-type]

    def keep_logs(self, lease: LeaseRecord, chunks: Sequence[pb.LogChunk]) -> None:
        """Hands a running attempt's output to the live logs (after this outcome's commit)."""
        a = lease.action
        self.logs.append(
            KeepLogs(
                lease.lease_id,
                a.workflow.workflow_id,
                a.spec.id,
                lease.attempt,
                lease.token,
                lease.worker.worker_id,
                chunks,
            )
        )


@dataclass(frozen=True, slots=True)
class KeepLogs:
    """Output of the attempt holding ``lease_id``, accepted from its holder: the runtime keeps
    it in memory for followers (coordinator.live_logs); nothing of it is journalled."""

    lease_id: str
    workflow_id: str
    action_id: str
    attempt: int
    token: int
    worker_id: str
    chunks: Sequence[pb.LogChunk]
