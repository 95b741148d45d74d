"""Hypothesis state machine over the pure core: safety holds whatever the interleaving.

Its workflows use every timer the core arms (queue, run and progress timeouts, hedges,
deadlines, retry backoff), maps and pipelines, and ``plait retry``; at the end the journal is
replayed and must rebuild the same state, timers included.
"""

from __future__ import annotations

from collections import Counter

from google.rpc import code_pb2
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plait.coordinator.core import joins, liveness
from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import Instant, RetryRequested
from plait.coordinator.core.model import WorkflowRecord
from plait.coordinator.core.replay import replay
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import CONFIG, Driver, same_timers, snapshot, timers

E = pb.EventType
WORKERS = ["w1", "w2", "w3"]

TIMERS = ["queue", "run", "progress", "hedge", "hedge_p95", "deadline"]


def _set_timers(a: pb.ActionSpec, timed: list[str]) -> None:
    if "queue" in timed:
        a.queue_timeout.FromMilliseconds(2500)
    if "run" in timed:
        a.timeout.FromSeconds(4)
    if "progress" in timed:
        a.heartbeat_timeout.FromSeconds(3)
    if "hedge" in timed:
        a.speculate.after.FromMilliseconds(1500)
    if "hedge_p95" in timed:
        a.speculate.after_p95 = True


def recount(wf: WorkflowRecord) -> dict[int, int]:
    """A workflow's actions by state, counted from scratch."""
    return dict(Counter(a.state for a in wf.actions.values()))


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()
        self.n_wf = 0
        self.sessions: dict[str, str] = {}  # worker -> live session
        self.n_sessions = 0
        self.held: dict[str, dict[str, wpb.Lease]] = {w: {} for w in WORKERS}
        self.reclaimed: dict[str, list[wpb.Lease]] = {w: [] for w in WORKERS}
        self.all_leases: list[tuple[str, wpb.Lease]] = []
        self.max_token: dict[str, int] = {}
        self.seen = 0

    def _absorb(self, out: object) -> None:
        for session, msgs in out.sends.items():  # type: ignore[attr-defined]
            worker = next((w for w, s in self.sessions.items() if s == session), None)
            if worker is None:
                continue
            for m in msgs:
                if m.HasField("lease_grant"):
                    # Only a session that proved it hears the coordinator is leased to, and
                    # never beyond its credit plus the prefetch it asked for.
                    w = self.d.st.by_session.get(session)
                    assert w is None or liveness.hears(self.d.st, w), session
                    assert w is None or w.free >= -w.prefetch, (session, w.free, w.prefetch)
                    for lease in m.lease_grant.leases:
                        self.held[worker][lease.lease_id] = lease
                        self.all_leases.append((worker, lease))
                elif m.HasField("cancel_lease"):
                    for c in m.cancel_lease.leases:
                        lease = self.held[worker].pop(c.lease_id, None)
                        if lease is not None and c.reason == wpb.CANCEL_REASON_RECLAIMED:
                            self.reclaimed[worker].append(lease)  # handed back unrun later
        for end in out.closes:  # type: ignore[attr-defined]
            # The coordinator closed the stream (a silent session): the worker reconnects later.
            for worker, session in list(self.sessions.items()):
                if session == end.session_id:
                    del self.sessions[worker]

    @rule(
        width=st.integers(1, 4),
        depth=st.integers(1, 3),
        retries=st.integers(1, 2),
        join=st.sampled_from([pb.JOIN_KIND_ALL, pb.JOIN_KIND_ANY, pb.JOIN_KIND_AT_LEAST]),
        cancel_remaining=st.booleans(),
        fail_fast=st.booleans(),
        timed=st.lists(st.sampled_from(TIMERS), max_size=3, unique=True),
        fan=st.sampled_from(["", "map", "pipeline"]),
    )
    def submit(
        self,
        width: int,
        depth: int,
        retries: int,
        join: int,
        cancel_remaining: bool,
        fail_fast: bool,
        timed: list[str],
        fan: str,
    ) -> None:
        self.n_wf += 1
        spec = pb.WorkflowSpec(name="p", fail_fast=fail_fast)
        if "deadline" in timed:
            spec.deadline.FromSeconds(9)
        prev: list[str] = []
        for layer in range(depth):
            ids = [f"l{layer}n{i}" for i in range(width)]
            for aid in ids:
                a = spec.actions.add(id=aid, handler="h", needs=prev[:2])
                a.retry.max_attempts = retries
                if len(a.needs) > 1:
                    a.join.kind = join  # type: ignore[assignment]
                    a.join.cancel_remaining = cancel_remaining
                    if join == pb.JOIN_KIND_AT_LEAST:
                        a.join.at_least_count = 1
                a.retry.initial_backoff.FromMilliseconds(100)
                _set_timers(a, timed)
            prev = ids
        if fan and depth > 1:  # the last layer's first action fans out over its first need
            a = spec.actions[-width]
            if fan == "map":
                a.map.over = f"{a.needs[0]}.items"
            else:
                a.pipeline.over = f"{a.needs[0]}.items"
                for k in range(2):
                    _set_timers(a.pipeline.stages.add(id=f"s{k}", handler="h"), timed)
        self._absorb(self.d.submit(spec, f"wf-{self.n_wf}"))

    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 4), prefetch=st.integers(0, 3))
    def connect(self, worker: str, slots: int, prefetch: int) -> None:
        self.n_sessions += 1
        session = f"s{self.n_sessions}"
        # Like a real worker: what it was asked to hand back but has not yet is still queued.
        running = [
            wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token, slots=1)
            for l in [*self.held[worker].values(), *self.reclaimed[worker]]
        ]
        # Like a real worker: the last Welcome's resume token proves it is the same worker if
        # its previous stream still looks live.
        previous = self.sessions.get(worker)
        self.sessions[worker] = session
        out = self.d.hello(
            session,
            worker,
            slots=slots,
            running=running,
            resume_token=f"rt-{previous}" if previous else "",
            prefetch=prefetch,
        )
        for m in out.sends.get(session, []):
            if m.HasField("welcome"):
                for r in m.welcome.kill:
                    self.held[worker].pop(r.lease_id, None)
                    self.reclaimed[worker] = [
                        x for x in self.reclaimed[worker] if x.lease_id != r.lease_id
                    ]
        self._absorb(out)

    @rule(worker=st.sampled_from(WORKERS))
    def hand_back(self, worker: str) -> None:
        """The worker answers a RECLAIMED cancellation: the lease, unrun, reported CANCELLED."""
        if worker not in self.sessions or not self.reclaimed[worker]:
            return
        lease = self.reclaimed[worker].pop(0)
        session = self.sessions[worker]
        self._absorb(self.d.finish(session, lease, outcome=wpb.ACTION_OUTCOME_CANCELLED))
        self._absorb(self.d.msg(session, credit=wpb.Credit(slots=1)))

    @rule(worker=st.sampled_from(WORKERS))
    def disconnect(self, worker: str) -> None:
        session = self.sessions.pop(worker, None)
        if session is not None:
            self._absorb(self.d.close(session))

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        if worker in self.sessions:
            self._absorb(self.d.heartbeat(self.sessions[worker], list(self.held[worker].values())))

    @rule(worker=st.sampled_from(WORKERS), ok=st.booleans(), data=st.data())
    def finish(self, worker: str, ok: bool, data: st.DataObject) -> None:
        if worker not in self.sessions or not self.held[worker]:
            return
        lease_id = data.draw(st.sampled_from(sorted(self.held[worker])))
        lease = self.held[worker].pop(lease_id)
        outcome = wpb.ACTION_OUTCOME_SUCCEEDED if ok else wpb.ACTION_OUTCOME_FAILED
        session = self.sessions[worker]
        # An item list in every output: a map or pipeline over it has two items.
        self._absorb(self.d.finish(session, lease, outcome=outcome, outputs='{"items":[1,2]}'))
        self._absorb(self.d.msg(session, credit=wpb.Credit(slots=1)))

    @precondition(lambda self: bool(self.all_leases))
    @rule(data=st.data())
    def zombie_report(self, data: st.DataObject) -> None:
        """Any old lease reported again, by whoever is connected (a zombie or a duplicate).

        A report from a worker that was never granted that token changes nothing and is
        journalled nowhere (LEASE_NOT_HELD).
        """
        if not self.sessions:
            return
        granted_to, lease = data.draw(st.sampled_from(self.all_leases))
        reporter = data.draw(st.sampled_from(sorted(self.sessions)))
        before = snapshot(self.d.st)
        out = self.d.finish(self.sessions[reporter], lease)
        if reporter != granted_to:
            assert out.records == []
            assert snapshot(self.d.st) == before
            (ack,) = [m.ack for m in out.sends[self.sessions[reporter]] if m.HasField("ack")]
            assert ack.results[0].status.code == code_pb2.FAILED_PRECONDITION
        self._absorb(out)

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def impostor_hello(self, worker: str, data: st.DataObject) -> None:
        """A stream says hello with a connected worker's id, unproven: refused, nothing moves."""
        if worker not in self.sessions:
            return
        self.n_sessions += 1
        stolen = [
            wpb.LeaseReport(lease_id=l.lease_id, fencing_token=l.fencing_token, slots=1)
            for l in self.held[worker].values()
        ]
        guess = data.draw(st.sampled_from(["", "rt-s0", "x" * 43]))
        before = snapshot(self.d.st)
        out = self.d.hello(f"s{self.n_sessions}", worker, running=stolen, resume_token=guess)
        assert out.records == [] and snapshot(self.d.st) == before
        assert [c.code for c in out.closes] == [code_pb2.ALREADY_EXISTS]
        assert self.sessions[worker] not in {c.session_id for c in out.closes}

    @rule(seconds=st.sampled_from([0.05, 0.5, 2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self._absorb(self.d.advance(seconds))

    @precondition(lambda self: self.n_wf > 0)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        wf = data.draw(st.integers(1, self.n_wf))
        self._absorb(self.d.cancel(f"wf-{wf}"))

    @precondition(lambda self: self.n_wf > 0)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """``plait retry`` (refused unless the workflow ended without success)."""
        wf = data.draw(st.integers(1, self.n_wf))
        self._absorb(self.d.handle(RetryRequested("retry", f"wf-{wf}", reply=object())))

    @rule(worker=st.sampled_from(WORKERS))
    def progress(self, worker: str) -> None:
        """A progress report on every lease the worker holds (heartbeat_timeout)."""
        if worker in self.sessions and self.held[worker]:
            reports = [
                wpb.LeaseProgress(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
                for lease in self.held[worker].values()
            ]
            progress = wpb.ActionProgress(leases=reports)
            self._absorb(self.d.msg(self.sessions[worker], action_progress=progress))

    @invariant()
    def one_live_lease_per_action(self) -> None:
        """One live lease per action; two only while hedged (the second one is the hedge)."""
        keys = Counter(l.action.key for l in self.d.st.leases.values())
        for lease in self.d.st.leases.values():
            a = lease.action
            assert keys[a.key] == 1 + (a.hedge is not None)
            assert lease in (a.lease, a.hedge) and a.state in (t.LEASED, t.RUNNING)

    @invariant()
    def history_is_safe(self) -> None:
        new = self.d.records[self.seen :]
        self.seen = len(self.d.records)
        for ev in new:
            if ev.action_id and ev.fencing_token:
                key = f"{ev.workflow_id}/{ev.action_id}"
                if ev.type == E.EVENT_TYPE_ACTION_LEASED:
                    assert ev.fencing_token > self.max_token.get(key, 0), "tokens only grow"
                    self.max_token[key] = ev.fencing_token
        # Since the workflow's last `plait retry`: a retry re-opens what did not succeed.
        retried = {
            e.workflow_id: e.sequence
            for e in self.d.records
            if e.type == E.EVENT_TYPE_WORKFLOW_RETRIED
        }
        finished = Counter(
            (e.workflow_id, e.action_id)
            for e in self.d.records
            if e.sequence > retried.get(e.workflow_id, 0)
            and e.type
            in (
                E.EVENT_TYPE_ACTION_FINISHED,
                E.EVENT_TYPE_ACTION_CANCELLED,
                E.EVENT_TYPE_ACTION_SKIPPED,
            )
        )
        assert not finished or max(finished.values()) == 1, "one terminal outcome per action"
        for wf in self.d.st.workflows.values():
            for a in wf.actions.values():
                if a.state == t.SUCCEEDED:
                    # The highest, or (a hedge race) the one beside it.
                    hedged = a.spec.HasField("speculate") and a.token - 1 == a.committed_token
                    assert a.committed_token == a.token or hedged, "the committed is the highest"
                    if a.parent is not None and a.stage <= 0:
                        continue  # a map child or first stage runs on its parent's met join
                    ok = sum(n.state == t.SUCCEEDED for n in a.needs)
                    assert ok >= joins.required(a, len(a.needs)), "DAG order: join was met"

    @invariant()
    def slots_never_overbooked(self) -> None:
        for w in self.d.st.workers.values():
            if w.connected:
                held = sum(l.slots for l in w.leases.values())
                adopted = sum(l.slots for l in w.leases.values() if l.grant_seq == 0)
                # Slots plus the prefetch the session asked for (leases queued on the worker).
                room = w.slots + w.prefetch
                assert held + max(0, w.free) <= max(room, adopted), "leased past capacity"

    @invariant()
    def status_counts_kept(self) -> None:
        """The per-state counts kept on every move (ListWorkflows) equal a recount."""
        for wf in self.d.st.workflows.values():
            assert wf.counts() == recount(wf), wf.workflow_id

    def teardown(self) -> None:
        # Whatever happened, replaying the journal rebuilds exactly this state.
        fresh = SchedulerState(CONFIG)
        replay(fresh, self.d.records, Instant(self.d.mono, self.d.wall))
        assert snapshot(fresh) == snapshot(self.d.st)
        for wf in fresh.workflows.values():
            assert wf.counts() == recount(wf), f"replayed {wf.workflow_id}"
        live, replayed = timers(self.d.st), timers(fresh)
        assert same_timers(replayed, live), f"timers drift:\n{replayed}\n!=\n{live}"


CoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestCore = CoreMachine.TestCase
