"""Capacity and limits at dispatch (pure core, the limits aggregate).

A ready action is leased to a worker only if everything it needs is free right now: slots,
resources (cpu, memory, gpu, any named count), labels, the workflow's ``max_parallel``, its map's
width, and the permits of every semaphore it names. All of it is acquired together at the grant
and released together when the lease ends, so nothing is ever held while waiting for something
else (no hold-and-wait, hence no deadlock between semaphores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.coordinator.core.model import ActionRecord, LeaseRecord, WorkerRecord
from plait.spec.rules import semaphore_terms
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState


def semaphore_in_force(st: SchedulerState, req: pb.SemaphoreRequest) -> tuple[int, int]:
    """``(capacity, permits held)`` of ``req``'s semaphore as ``req`` sees it.

    Actions that disagree on a semaphore's capacity get the smallest, so the capacity is the
    least of the one recorded (at the last acquire) and the one ``req`` declares.
    """
    capacity, _ = semaphore_terms(req)
    cap, held = st.semaphores.get(req.name, (capacity, 0))
    return min(cap, capacity), held


def full_semaphore(st: SchedulerState, a: ActionRecord) -> tuple[str, int, int] | None:
    """The first semaphore ``a`` names that lacks its permits now, as ``(name, capacity,
    held)``, or None when every one has room."""
    for req in a.spec.semaphores:
        cap, held = semaphore_in_force(st, req)
        if held + semaphore_terms(req)[1] > cap:
            return req.name, cap, held
    return None


def fits(st: SchedulerState, a: ActionRecord, w: WorkerRecord, extra: int = 0) -> bool:
    """Whether worker ``w`` can run ``a`` now (``extra``: slots it may be granted beyond its
    free ones, as prefetch)."""
    spec = a.spec
    if a.slots > w.free + extra:
        return False
    if spec.handler:
        if spec.handler not in w.handlers:
            return False
    elif not w.exec_enabled:
        return False
    if spec.selector and not all(w.labels.get(k) == v for k, v in spec.selector.items()):
        return False
    if spec.resources:
        used = w.used
        for name, amount in spec.resources.items():
            if w.resources.get(name, 0.0) - used.get(name, 0.0) < amount - 1e-9:
                return False
    wf = a.workflow
    if wf.spec.max_parallel and wf.leased >= wf.spec.max_parallel:
        return False
    parent = a.parent
    if parent is not None:
        width = parent.spec.map.max_parallel
        if width and parent.running_children >= width:
            return False
        flight = parent.spec.pipeline.max_in_flight
        if flight and a.stage == 0 and not a.opened and parent.in_flight >= flight:
            return False  # back-pressure: no new item enters a full pipeline
    return not spec.semaphores or semaphores_free(st, a)


def could_ever_run(a: ActionRecord, w: WorkerRecord) -> bool:
    """Whether ``w`` could run ``a`` once it is idle (for "why is it waiting")."""
    spec = a.spec
    if a.slots > w.slots:
        return False
    if spec.handler and spec.handler not in w.handlers:
        return False
    if not spec.handler and not w.exec_enabled:
        return False
    if any(w.resources.get(k, 0.0) < v - 1e-9 for k, v in spec.resources.items()):
        return False
    return all(w.labels.get(k) == v for k, v in spec.selector.items())


def semaphores_free(st: SchedulerState, a: ActionRecord) -> bool:
    """Whether every semaphore ``a`` names has its permits free now."""
    return full_semaphore(st, a) is None


def acquire(st: SchedulerState, lease: LeaseRecord) -> None:
    """Takes everything ``lease``'s action holds while it runs (slots are the worker's)."""
    a, w = lease.action, lease.worker
    spec = a.spec
    if spec.resources:  # (iterating an empty protobuf map costs microseconds)
        for name, amount in spec.resources.items():
            w.used[name] = w.used.get(name, 0.0) + amount
    a.workflow.leased += 1
    if a.parent is not None:
        a.parent.running_children += 1
        if a.stage == 0 and not a.opened:
            a.opened = True
            a.parent.in_flight += 1
    if spec.semaphores:
        for req in spec.semaphores:
            cap, held = semaphore_in_force(st, req)
            st.semaphores[req.name] = (cap, held + semaphore_terms(req)[1])


def release(st: SchedulerState, lease: LeaseRecord) -> None:
    """Gives back what :func:`acquire` took."""
    a, w = lease.action, lease.worker
    spec = a.spec
    if spec.resources:  # (iterating an empty protobuf map costs microseconds)
        for name, amount in spec.resources.items():
            w.used[name] = w.used.get(name, 0.0) - amount
    a.workflow.leased -= 1
    if a.parent is not None:
        a.parent.running_children -= 1
    if spec.semaphores:
        for req in spec.semaphores:
            cap, held = st.semaphores[req.name]
            st.semaphores[req.name] = (cap, held - semaphore_terms(req)[1])


def usage(st: SchedulerState) -> dict[str, tuple[int, int]]:
    """Semaphores in use: name -> (capacity, permits held), for status and metrics."""
    return dict(st.semaphores)
