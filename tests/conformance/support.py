"""Helpers of the conformance tests: specs made of the four handlers, and history queries.

Everything here asserts from outside the worker: the coordinator's history, status and
ListWorkers, never anything the worker under test writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from google.protobuf import duration_pb2

from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import workflow_pb2 as wf
from tests.system import invariants, journal_check
from tests.system.harness import Cluster, describe

# Events after which a lease no longer holds a slot on its worker.
LEASE_ENDS = frozenset(
    {
        wf.EVENT_TYPE_ACTION_FINISHED,
        wf.EVENT_TYPE_LEASE_LOST,
        wf.EVENT_TYPE_ACTION_RETRY_SCHEDULED,
        wf.EVENT_TYPE_ACTION_CANCELLED,
    }
)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def action(
    action_id: str,
    handler: str,
    input_value: Any = None,
    *,
    needs: Sequence[str] = (),
    **fields: Any,
) -> wf.ActionSpec:
    """An action served by one of the conformance handlers, with a JSON static input."""
    return wf.ActionSpec(
        id=action_id,
        handler=handler,
        needs=list(needs),
        input_json="" if input_value is None else json.dumps(input_value),
        **fields,
    )


def spec(name: str, actions: Iterable[wf.ActionSpec]) -> wf.WorkflowSpec:
    return wf.WorkflowSpec(name=name, actions=list(actions))


def workers(cluster: Cluster) -> dict[str, admin_pb.WorkerInfo]:
    reply = cluster.admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=10)
    return {w.worker_id: w for w in reply.workers}


def listed(
    cluster: Cluster,
    worker_id: str,
    predicate: Callable[[admin_pb.WorkerInfo], bool] = lambda _: True,
) -> Callable[[], admin_pb.WorkerInfo | None]:
    """A :func:`wait_for` probe: the worker's ListWorkers entry once ``predicate`` holds."""

    def probe() -> admin_pb.WorkerInfo | None:
        info = workers(cluster).get(worker_id)
        return info if info is not None and predicate(info) else None

    return probe


def run_to_end(
    cluster: Cluster, workflow: wf.WorkflowSpec, timeout: float = 60.0
) -> tuple[str, wf.WorkflowStatus, list[wf.HistoryEvent]]:
    """Submits, waits until terminal; returns the id, final status and whole history."""
    workflow_id = cluster.submit(workflow)
    status = cluster.wait_workflow(workflow_id, timeout=timeout)
    return workflow_id, status, cluster.history(workflow_id)


def succeeded(status: wf.WorkflowStatus) -> None:
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)


def check_all(
    cluster: Cluster,
    events: Sequence[wf.HistoryEvent],
    workflow: wf.WorkflowSpec,
    *,
    all_finished: bool = True,
) -> None:
    """The history invariants of one workflow, then the whole SQLite journal's."""
    invariants.check_history(events, workflow, all_finished=all_finished)
    journal_check.check_sqlite_journal(cluster.tmp / "plait.db")


def started(
    cluster: Cluster, workflow_id: str, action_id: str, timeout: float = 30.0
) -> wf.HistoryEvent:
    """Waits until the action's ACTION_STARTED is journalled (the worker runs it)."""
    return cluster.wait_event(
        workflow_id,
        lambda e: e.type == wf.EVENT_TYPE_ACTION_STARTED and e.action_id == action_id,
        f"{action_id} to start",
        timeout=timeout,
    )


def max_concurrent(events: Sequence[wf.HistoryEvent], worker_id: str) -> tuple[int, int]:
    """The most leases, and the most started attempts, ``worker_id`` held at once, replaying
    the history in journal (= HLC) order."""
    leased: set[str] = set()
    running: set[str] = set()
    most_leased = most_running = 0
    for e in sorted(events, key=lambda e: e.sequence):
        if e.type == wf.EVENT_TYPE_ACTION_LEASED and e.worker_id == worker_id:
            leased.add(e.lease_id)
        elif e.type == wf.EVENT_TYPE_ACTION_STARTED and e.worker_id == worker_id:
            running.add(e.lease_id)
        elif e.type in LEASE_ENDS:
            ends = {e.lease_id} if e.lease_id else set()
            if not e.lease_id:  # cancelled without naming a lease: whatever the action held
                ends = {x.lease_id for x in events if x.action_id == e.action_id and x.lease_id}
            leased -= ends
            running -= ends
        most_leased = max(most_leased, len(leased))
        most_running = max(most_running, len(running))
    return most_leased, most_running
