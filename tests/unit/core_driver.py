"""Drives the pure core by hand: stimuli in, outcomes out, time moved explicitly."""

from __future__ import annotations

from datetime import timedelta

from plait.coordinator.core.events import (
    CancelRequested,
    Instant,
    Stimulus,
    TimePassed,
    WorkerMessageReceived,
    WorkerStreamClosed,
    WorkflowSubmitted,
)
from plait.coordinator.core.model import Outcome
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
    ) -> Outcome:
        """A Hello on a new stream; like the servicer, gives the session the resume token
        ``rt-SESSION`` (``resume_token`` is the one the worker presents)."""
        m = wpb.ConnectRequest(
            hello=wpb.Hello(
                worker_id=worker_id,
                slots=slots,
                handlers=handlers,
                running=running or [],
                resume_token=resume_token,
            )
        )
        m.hlc.physical_ms = self.wall
        return self.handle(
            WorkerMessageReceived("w", session, m, identity=identity, resume_token=f"rt-{session}")
        )

    def heartbeat(
        self, session: str, leases: list[wpb.Lease], seq: int = 1, last_grant: int = 1_000_000
    ) -> Outcome:
        return self.msg(
            session,
            heartbeat=wpb.Heartbeat(
                sequence=seq,
                last_grant_sequence=last_grant,
                leases=[
                    wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token)
                    for l in leases
                ],
            ),
        )

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
