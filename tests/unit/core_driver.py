"""Drives the pure core by hand: stimuli in, outcomes out, time moved explicitly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import (
    CancelRequested,
    Instant,
    Stimulus,
    TimePassed,
    WorkerMessageReceived,
    WorkerStreamClosed,
    WorkflowSubmitted,
)
from plait.coordinator.core.model import ActionRecord, LeaseRecord, Outcome
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import CoreConfig, SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

CONFIG = CoreConfig(
    heartbeat_interval=timedelta(seconds=1),
    lease_ttl=timedelta(seconds=5),
    kill_grace=timedelta(seconds=1),
    lease_loss_budget=3,
)


class Driver:
    def __init__(self, config: CoreConfig = CONFIG) -> None:
        self.st = SchedulerState(config)
        self.mono = 100.0
        self.wall = 1_700_000_000_000
        self.n = 0
        self.records: list[pb.HistoryEvent] = []
        self.beats: dict[str, int] = {}  # session -> last heartbeat sequence sent
        self.heard: dict[str, int] = {}  # session -> newest heartbeat ack it received

    def at(self) -> Instant:
        return Instant(self.mono, self.wall)

    def advance(self, seconds: float) -> Outcome:
        self.mono += seconds
        self.wall += int(seconds * 1000)
        return self.handle(TimePassed("tick"))

    def handle(self, *stimuli: Stimulus) -> Outcome:
        out = self.st.handle_batch(stimuli, self.at())
        self.records.extend(out.records)
        return out

    def submit(self, spec: pb.WorkflowSpec, wf_id: str = "wf-1", key: str = "") -> Outcome:
        return self.handle(WorkflowSubmitted("submit", wf_id, spec, key, reply=object()))

    def msg(self, session: str, **kw: object) -> Outcome:
        m = wpb.ConnectRequest(**kw)  # type: ignore[arg-type]
        m.hlc.physical_ms = self.wall
        return self.handle(WorkerMessageReceived("w", session, m))

    def hello(
        self,
        session: str,
        worker_id: str,
        slots: int = 4,
        handlers: tuple[str, ...] = ("h",),
        running: list[wpb.LeaseReport] | None = None,
        resume_token: str = "",
        identity: str = "",
        prefetch: int = 0,
    ) -> Outcome:
        """A Hello on a new stream; like the servicer, gives the session the resume token
        ``rt-SESSION`` (``resume_token`` is the one the worker presents). Like a real worker
        once welcomed, it heartbeats at once (same batch): that proves it hears the session."""
        hello = wpb.Hello(
            worker_id=worker_id,
            slots=slots,
            handlers=handlers,
            running=running or [],
            resume_token=resume_token,
            prefetch=prefetch,
        )
        return self.hello_with(session, hello, identity=identity)

    def hello_with(self, session: str, hello: wpb.Hello, identity: str = "") -> Outcome:
        """A Hello as given (``exec_enabled``, labels, resources …) and the heartbeat a
        welcomed worker sends at once; resume token ``rt-SESSION``."""
        m = wpb.ConnectRequest(hello=hello)
        m.hlc.physical_ms = self.wall
        self.heard[session] = 0
        hb = self._heartbeat_msg(session, list(hello.running), None, last_grant=0)
        return self._acked(
            session,
            self.handle(
                WorkerMessageReceived(
                    "w", session, m, identity=identity, resume_token=f"rt-{session}"
                ),
                WorkerMessageReceived("w", session, hb),
            ),
        )

    def _heartbeat_msg(
        self, session: str, leases: list[Any], seq: int | None, last_grant: int
    ) -> wpb.ConnectRequest:
        """A heartbeat as a real worker sends it: the next sequence, and the echo of the newest
        ack the session got (its proof that it hears the coordinator)."""
        seq = self.beats.get(session, 0) + 1 if seq is None else seq
        self.beats[session] = max(seq, self.beats.get(session, 0))
        m = wpb.ConnectRequest(
            heartbeat=wpb.Heartbeat(
                sequence=seq,
                last_grant_sequence=last_grant,
                last_ack_sequence=self.heard.get(session, 0),
                leases=[
                    wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token)
                    for l in leases
                ],
            )
        )
        m.hlc.physical_ms = self.wall
        return m

    def _acked(self, session: str, out: Outcome) -> Outcome:
        """Remembers the newest heartbeat ack the session received (echoed next time)."""
        for msg in out.sends.get(session, ()):
            if msg.HasField("ack") and msg.ack.heartbeat_sequence:
                self.heard[session] = max(self.heard.get(session, 0), msg.ack.heartbeat_sequence)
        return out

    def heartbeat(
        self,
        session: str,
        leases: list[wpb.Lease],
        seq: int | None = None,
        last_grant: int = 1_000_000,
    ) -> Outcome:
        m = self._heartbeat_msg(session, leases, seq, last_grant)
        return self._acked(session, self.handle(WorkerMessageReceived("w", session, m)))

    def finish(
        self,
        session: str,
        lease: wpb.Lease,
        outcome: int = wpb.ACTION_OUTCOME_SUCCEEDED,
        outputs: str = "{}",
        exit_code: int = 0,
    ) -> Outcome:
        return self.msg(
            session,
            action_finished=wpb.ActionFinished(
                results=[
                    wpb.ActionResult(
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token,
                        outcome=outcome,  # type: ignore[arg-type]
                        outputs_json=outputs,
                        exit_code=exit_code,
                    )
                ]
            ),
        )

    def close(self, session: str) -> Outcome:
        return self.handle(WorkerStreamClosed("closed", session))

    def cancel(self, wf_id: str = "wf-1") -> Outcome:
        return self.handle(CancelRequested("cancel", wf_id, "user", reply=object()))

    def state(self, action_id: str, wf_id: str = "wf-1") -> str:
        return pb.ActionState.Name(self.st.workflows[wf_id].actions[action_id].state)  # type: ignore[arg-type]


def grants(out: Outcome, session: str | None = None) -> list[wpb.Lease]:
    leases: list[wpb.Lease] = []
    for s, msgs in out.sends.items():
        if session is None or s == session:
            for m in msgs:
                if m.HasField("lease_grant"):
                    leases.extend(m.lease_grant.leases)
    return leases


def messages(out: Outcome, session: str, kind: str) -> list[wpb.ConnectResponse]:
    return [m for m in out.sends.get(session, []) if m.WhichOneof("message") == kind]


def chain(n: int, handler: str = "h") -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="chain")
    for i in range(n):
        s.actions.add(id=f"a{i}", handler=handler, needs=[f"a{i - 1}"] if i else [])
    return s


def independent(n: int, handler: str = "h") -> pb.WorkflowSpec:
    s = pb.WorkflowSpec(name="flat")
    for i in range(n):
        s.actions.add(id=f"a{i}", handler=handler)
    return s


def snapshot(st: SchedulerState) -> dict[str, object]:
    """Everything replay must restore, per workflow and action."""
    out: dict[str, object] = {}
    for wf in st.workflows.values():
        out[wf.workflow_id] = (wf.state, wf.cancel_requested, wf.remaining, wf.reason)
        for a in wf.actions.values():
            out[a.key] = (
                a.state,
                a.token,
                a.attempt,
                a.failures,
                a.lease_losses,
                a.committed_token,
                a.outputs_json,
                a.unmet,
                a.failed_needs,
                a.item_json,
                a.lease.lease_id if a.lease else None,
            )
    return out


def timers(st: SchedulerState) -> dict[str, list[tuple[object, ...]]]:
    """Every timer that would still act, and when (replay must restore each one).

    Entries a timer's check would ignore (an ended lease, an action no longer READY with that
    token) are left out, as is a hedge check already due (it counts as a hedge asked for).
    Progress checks restart at a replay (reports are not journalled), so only which lease has
    one is compared, not when.
    """
    live = pb.WORKFLOW_STATE_RUNNING
    ready = pb.ACTION_STATE_READY
    hedged_states = (pb.ACTION_STATE_LEASED, pb.ACTION_STATE_RUNNING)

    def hedgeable(lease_id: str) -> bool:
        lease = st.leases.get(lease_id)
        a = lease.action if lease else None
        return (
            a is not None
            and a.lease is lease
            and a.hedge is None
            and lease.token == a.token
            and a.state in hedged_states
        )

    wanted = {
        a.key for a in st.hedges_wanted if a.lease is not None and hedgeable(a.lease.lease_id)
    }
    wanted |= {
        st.leases[lid].action.key
        for due, _, lid in st.hedge_deadlines
        if due <= st.now and hedgeable(lid)
    }
    actions = [a for wf in st.workflows.values() for a in wf.actions.values()]
    return {
        "queue": sorted(
            {
                (a.key, token, due)
                for due, seq, _, a, token in st.queue_deadlines
                if a.state == ready
                and a.ready_seq == seq
                and a.token == token
                and a.workflow.state == live
            }
        ),
        "retry_at": sorted(
            (a.key, a.not_before) for a in actions if a.state == ready and a.not_before
        ),
        "run": sorted({(lid, due) for due, _, lid in st.deadlines if lid in st.leases}),
        "progress": sorted({(lid,) for _, _, lid in st.progress_deadlines if lid in st.leases}),
        "hedge": sorted(
            {(lid, due) for due, _, lid in st.hedge_deadlines if due > st.now and hedgeable(lid)}
        ),
        "hedge_wanted": sorted((key,) for key in wanted),
        "workflow_deadline": sorted(
            {
                (wf_id, due)
                for due, seq, wf_id in st.workflow_deadlines
                if wf_id in st.workflows
                and st.workflows[wf_id].state == live
                and st.workflows[wf_id].run_seq == seq
            }
        ),
        "samples": sorted((k, *sorted(v)) for k, v in st.durations.items()),
    }


def same_timers(
    a: dict[str, list[tuple[object, ...]]], b: dict[str, list[tuple[object, ...]]]
) -> bool:
    """``timers(a) == timers(b)``, times within a microsecond (the journal keeps nanoseconds)."""

    def close(x: object, y: object) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return abs(x - y) < 1e-6
        return x == y

    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k])
        and all(len(x) == len(y) and all(map(close, x, y)) for x, y in zip(a[k], b[k], strict=True))
        for k in a
    )


# ---- replay of every prefix (tests/unit/test_replay_prefix.py) --------------------------------


def replayed(events: Iterable[pb.HistoryEvent], at: Instant) -> SchedulerState:
    """A fresh core (``CONFIG``) that replayed ``events`` at ``at``, as a restart would."""
    fresh = SchedulerState(CONFIG)
    replay(fresh, events, at)
    return fresh


def _seconds(x: float) -> float:
    return round(x, 6)  # replay dates events by wall-clock milliseconds: float noise only


def deep_snapshot(st: SchedulerState) -> dict[str, object]:
    """:func:`snapshot` plus the rest of what a restart must restore.

    Each live lease (primary and hedge: holder, token, attempt, start, grant time), each
    action's error, reason, exit code, holder and committed outputs, the fan-out bookkeeping
    (children, leases held by children, items in flight), which READY actions are queued, the
    per-workflow lease count and the semaphore permits held. Not what replay cannot know and
    deliberately restarts: worker sessions and credit, TTLs, progress waits, grant sequences.
    A workflow's ``failing`` is compared while it runs (on a finished one it means nothing).
    """
    out = snapshot(st)
    ready = t.READY

    def lease(x: LeaseRecord | None) -> tuple[object, ...] | None:
        if x is None:
            return None
        return (
            x.lease_id,
            x.worker.worker_id,
            x.token,
            x.attempt,
            x.slots,
            x.started,
            _seconds(x.granted_at),
        )

    for wf in st.workflows.values():
        running = wf.state == pb.WORKFLOW_STATE_RUNNING
        out[f"{wf.workflow_id}+"] = {
            "leased": wf.leased,
            "failing": wf.failing if running else "",
            "finished_wall_ms": wf.finished_wall_ms,
            "finished_hlc": wf.finished_hlc,
            "submitted_wall_ms": wf.submitted_wall_ms,
            "idempotency_key": wf.idempotency_key,
            "queued": sorted(a.spec.id for a in wf.ready if a.state == ready),
        }
        for a in wf.actions.values():
            out[f"{a.key}+"] = {
                "lease": lease(a.lease),
                "hedge": lease(a.hedge),
                "error": (a.error.code, a.error.message) if a.error is not None else None,
                "reason": a.reason,
                "exit_code": a.exit_code,
                "ready_at": _seconds(a.ready_at),  # where schedule-to-start counts from
                "worker_id": a.worker_id,
                "outputs_ref": a.outputs_ref,
                "outputs_bytes": a.outputs_bytes,
                "holders": dict(a.holders or {}),
                "parent": a.parent.spec.id if a.parent is not None else None,
                "children": [c.spec.id for c in a.children] if a.children is not None else None,
                "running_children": a.running_children,
                "in_flight": a.in_flight,
                "opened": a.opened,
                "stage": a.stage,
                "last_stage": a.last_stage,
            }
    out["leases"] = sorted(st.leases)
    out["holders"] = sorted(
        (w.worker_id, sorted(w.leases), sorted((k, v) for k, v in w.used.items() if v))
        for w in st.workers.values()
        if w.leases
    )
    out["semaphores"] = sorted((k, v) for k, v in st.semaphores.items() if v[1])
    out["idempotency"] = sorted(st.by_idempotency_key.items())
    out["sequence"] = st.sequence
    return out


def differences(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """Where two snapshots differ, ``key: a != b`` (a named field's own name, for a
    :func:`deep_snapshot` entry), for failure messages."""
    out = []
    for k in sorted(a.keys() | b.keys()):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{k} {f}: {x.get(f)!r} != {y.get(f)!r}" for f in x if x.get(f) != y.get(f)]
        else:
            out.append(f"{k}: {x!r} != {y!r}")
    return out


def broken_invariants(st: SchedulerState) -> list[str]:
    """What is structurally wrong with a core (empty when nothing is), at any event boundary.

    Every live lease is its action's primary or hedge, held by a known worker, on an action
    LEASED or RUNNING; every such action (one that does not fan out) holds a lease; a hedge
    only beside a primary; per-workflow counts (``remaining``, ``leased``, by state) and
    per-action join counts (``unmet``, ``failed_needs`` over its needs, or its children once it
    fanned out) agree with the actions' states.
    """
    bad = _lease_invariants(st)
    for wf in st.workflows.values():
        open_ = sum(a.state not in t.TERMINAL for a in wf.actions.values())
        if wf.remaining != open_:
            bad.append(f"{wf.workflow_id}: remaining {wf.remaining}, {open_} actions open")
        if wf.state != pb.WORKFLOW_STATE_RUNNING and open_:
            bad.append(f"{wf.workflow_id} ended with {open_} actions open")
        leased = sum(x.action.workflow is wf for x in st.leases.values())
        if wf.leased != leased:
            bad.append(f"{wf.workflow_id}: leased {wf.leased}, {leased} live leases")
        counted = dict(Counter(a.state for a in wf.actions.values()))
        if wf.counts() != counted:
            bad.append(f"{wf.workflow_id}: state counts {wf.counts()}, recounted {counted}")
        for a in wf.actions.values():
            bad.extend(_action_invariants(st, a))
    return bad


def _name(state: int) -> str:
    return t.S.Name(state)  # type: ignore[arg-type]


def _lease_invariants(st: SchedulerState) -> list[str]:
    bad = []
    for lid, x in st.leases.items():
        a = x.action
        if x.lease_id != lid or x not in (a.lease, a.hedge):
            bad.append(f"lease {lid} is not {a.key}'s")
        if a.state not in (t.LEASED, t.RUNNING):
            bad.append(f"lease {lid} on {a.key} in {_name(a.state)}")
        if st.workers.get(x.worker.worker_id) is not x.worker or x.worker.leases.get(lid) is not x:
            bad.append(f"lease {lid} not held by a known worker")
    for w in st.workers.values():
        bad.extend(
            f"{w.worker_id} holds {lid}, not live" for lid in w.leases if lid not in st.leases
        )
    return bad


def _action_invariants(st: SchedulerState, a: ActionRecord) -> list[str]:
    bad = []
    for x in (a.lease, a.hedge):
        if x is not None and st.leases.get(x.lease_id) is not x:
            bad.append(f"{a.key} points at {x.lease_id}, not a live lease")
    if a.hedge is not None and a.lease is None:
        bad.append(f"{a.key} hedged without a primary")
    if a.state in (t.LEASED, t.RUNNING) and a.children is None and a.lease is None:
        bad.append(f"{a.key} {_name(a.state)} without a lease")
    if a.children is not None:
        held = sum(x.action.parent is a for x in st.leases.values())
        if a.running_children != held:
            bad.append(f"{a.key}: running_children {a.running_children}, {held} held")
    if a.parent is not None and a.stage <= 0:
        return bad  # a map child or first stage runs on its parent's (met) join
    over = a.children if a.children is not None else a.needs
    unmet = sum(n.state != t.SUCCEEDED for n in over)
    failed = sum(n.state in t.TERMINAL and n.state != t.SUCCEEDED for n in over)
    if (a.unmet, a.failed_needs) != (unmet, failed):
        bad.append(
            f"{a.key}: unmet/failed_needs {a.unmet}/{a.failed_needs}, states say {unmet}/{failed}"
        )
    return bad


@dataclass(frozen=True)
class Batch:
    """One handled batch: where its records end in the journal, when it was handled, and the
    live state right after it (:func:`deep_snapshot`, :func:`timers`, :func:`broken_invariants`)."""

    end: int  # len(records) after the batch
    at: Instant
    state: dict[str, object]
    timers: dict[str, list[tuple[object, ...]]]
    broken: list[str]


class RecordingDriver(Driver):
    """A :class:`Driver` that keeps a :class:`Batch` after every batch it handles."""

    def __init__(self, config: CoreConfig = CONFIG) -> None:
        super().__init__(config)
        self.batches: list[Batch] = []

    def handle(self, *stimuli: Stimulus) -> Outcome:
        out = super().handle(*stimuli)
        st = self.st
        batch = Batch(
            len(self.records), self.at(), deep_snapshot(st), timers(st), broken_invariants(st)
        )
        self.batches.append(batch)
        return out

    def started(self, session: str, *leases: wpb.Lease) -> Outcome:
        """The worker reports these attempts started."""
        reports = [
            wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token) for l in leases
        ]
        return self.msg(session, action_started=wpb.ActionStarted(leases=reports))

    def done(
        self,
        session: str,
        lease: wpb.Lease,
        outcome: int = wpb.ACTION_OUTCOME_SUCCEEDED,
        outputs: str = "{}",
        exit_code: int = 0,
    ) -> Outcome:
        """A result with the lease's slot credited back in the same message, as workerd does."""
        result = wpb.ActionResult(
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            outcome=outcome,  # type: ignore[arg-type]
            outputs_json=outputs,
            exit_code=exit_code,
        )
        slots = lease.action.slots or 1
        return self.msg(session, action_finished=wpb.ActionFinished(results=[result], credit=slots))
