"""Helpers shared by the coordinator restart and failover system tests.

``marked`` actions record every attempt that ran to completion (``workflow action token`` lines
in a file), so a test can compare what workers finished with what the journal committed
(:func:`tests.system.journal_check.check_completed_attempts_committed`); ``health`` asks a
coordinator's standard gRPC health service whether it serves (the leader) or not (a standby).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plait.coordinator.core.sessions import UNDELIVERED
from plait.v1 import workflow_pb2 as wf
from tests.system.harness import command_action

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A completing exec attempt appends "workflow action token" to the file named by argv $1.
MARK = 'echo "$PLAIT_WORKFLOW_ID $PLAIT_ACTION_ID $PLAIT_FENCING_TOKEN" >> "$1"'


def marked(
    action_id: str,
    marks: Path,
    sleep_s: float,
    needs: Sequence[str] = (),
    gate: Path | None = None,
) -> wf.ActionSpec:
    """An exec action that sleeps (or, with ``gate``, waits until that file exists), then
    records its completion (workflow, action, token).

    A gate keeps work in flight for as long as a test needs it, however slowly a loaded
    machine gets the test to its fault: a fixed sleep can run out first.
    """
    wait = f"until [ -e {shlex.quote(str(gate))} ]; do sleep 0.05; done" if gate else ""
    script = f"{wait or f'sleep {sleep_s}'}; {MARK}"
    return command_action(action_id, ["sh", "-c", script, "mark", str(marks)], needs=list(needs))


def health(target: str, timeout: float = 1.0) -> int | None:
    """The coordinator's overall health status, or None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return int(reply.status)


def lost_leases(events: Sequence[wf.HistoryEvent]) -> list[wf.HistoryEvent]:
    """The LEASE_LOST events among ``events`` that lost a lease a worker held.

    Not such a loss: a queued lease handed back unstarted for an idle worker (RECLAIMED,
    prefetch), and a grant journalled just before a crash that never reached its worker (the
    coordinator sends grants only after their commit; the new leader finds the worker without
    it): UNDELIVERED with no start report for that token among ``events``.
    """
    started = {
        (e.workflow_id, e.action_id, e.fencing_token)
        for e in events
        if e.type == wf.EVENT_TYPE_ACTION_STARTED
    }
    return [
        e
        for e in events
        if e.type == wf.EVENT_TYPE_LEASE_LOST
        and e.reason != wf.EVENT_REASON_RECLAIMED
        and (e.message != UNDELIVERED or (e.workflow_id, e.action_id, e.fencing_token) in started)
    ]
