"""Worker sessions (pure core, the worker aggregate of SchedulerState).

One stream per worker: the ``hello`` that opens it (identity rules, re-adoption of what a
reconnecting worker still runs), heartbeats (renewal and reconciliation both ways), starts,
progress, credits, ``goodbye``, the stream's end, and drains. Results go to
:mod:`~plait.coordinator.core.results`; leases themselves live in
:mod:`~plait.coordinator.core.sessions`. Like the rest of the core this does no I/O.

* a lease lives ``lease_ttl`` after the later of its grant and the worker's last heartbeat;
* heartbeats list every lease held, and reconciliation runs both ways;
* a reconnecting worker re-adopts the leases whose tokens are still current;
* a live worker id is taken over only by a stream proven to be that worker.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.rpc import code_pb2

from plait.coordinator.core import liveness, prefetch, results
from plait.coordinator.core import transitions as t
from plait.coordinator.core.events import DrainRequested, WorkerMessageReceived, WorkerStreamClosed
from plait.coordinator.core.model import Outcome, WorkerRecord
from plait.coordinator.core.sessions import (
    UNDELIVERED,
    UNDELIVERED_STREAM,
    action_for_lease_id,
    lose_lease,
)
from plait.hlc import ClockOffsetError, HlcTimestamp
from plait.v1 import hlc_pb2
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_TYPE_* as module constants: enum-wrapper attribute access is slow
R = wpb  # CANCEL_REASON_* constants


def on_worker_message(st: SchedulerState, s: WorkerMessageReceived, out: Outcome) -> None:
    """Routes one stream message; the servicer guarantees the first one is ``hello``."""
    msg = s.message
    kind = msg.WhichOneof("message")
    if kind == "hello":
        if s.session_id in st.by_session:
            # One hello per stream: a second one is a protocol error, not a reconnect.
            out.close(
                s.session_id,
                code_pb2.INVALID_ARGUMENT,
                f"a second hello on session {s.session_id}; hello must be the first message"
                " and only the first",
                field="message",
            )
            return
        on_hello(st, s, out)
        return
    w = st.by_session.get(s.session_id)
    if w is None:  # replaced by a newer session of the same worker: ignore its stragglers
        return
    w.last_seen = st.now
    remote = observe_hlc(st, w, msg, out)
    if kind == "action_finished":
        finished = msg.action_finished
        for res in finished.results:
            results.on_result(st, w, s.session_id, res, remote, out)
        if finished.started:  # queued leases that took the slots these results freed
            on_started(st, w, finished.started, remote, out)
        if finished.credit:
            w.free = min(w.slots, w.free + finished.credit)
    elif kind == "heartbeat":
        on_heartbeat(st, w, msg.heartbeat, out)
    elif kind == "credit":
        w.free = min(w.slots, w.free + msg.credit.slots)
    elif kind == "action_started":
        on_started(st, w, msg.action_started.leases, remote, out)
    elif kind == "goodbye":
        w.draining = True
        w.said_goodbye = True
    elif kind == "action_progress":
        on_progress(st, w, msg.action_progress, out)
    elif kind == "action_logs":
        on_logs(st, w, msg.action_logs, out)


def on_progress(
    st: SchedulerState, w: WorkerRecord, progress: wpb.ActionProgress, out: Outcome
) -> None:
    """Progress of the worker's attempts resets their heartbeat_timeout; a report for a lease
    this session does not hold is refused (``Ack.refused``)."""
    for p in progress.leases:
        lease = w.leases.get(p.lease_id)
        if lease is not None and lease.token == p.fencing_token:
            lease.last_progress = st.now
        else:
            results.refuse_report(st, w, p.lease_id, p.fencing_token, "progress", out)


def on_logs(st: SchedulerState, w: WorkerRecord, logs: wpb.ActionLogs, out: Outcome) -> None:
    """Live output of the worker's attempts goes to the live logs (an effect: never
    journalled), only from the lease's holder with its current token; a zombie's (a stale
    token) or anyone else's is refused (``Ack.refused``) and dropped."""
    for entry in logs.leases:
        lease = w.leases.get(entry.lease_id)
        if lease is not None and lease.token == entry.fencing_token:
            out.keep_logs(lease, entry.chunks)
        else:
            results.refuse_report(st, w, entry.lease_id, entry.fencing_token, "logs", out)


def on_started(
    st: SchedulerState,
    w: WorkerRecord,
    reports: Iterable[wpb.LeaseReport],
    remote: HlcTimestamp,
    out: Outcome,
) -> None:
    """Attempts the worker started: LEASED -> RUNNING, journalled with the worker's stamp.

    A start for a lease this session does not hold is refused (``Ack.refused``), unjournalled.
    """
    for r in reports:
        lease = w.leases.get(r.lease_id)
        if lease is None or lease.token != r.fencing_token:
            results.refuse_report(st, w, r.lease_id, r.fencing_token, "started", out)
            continue
        if not lease.started:
            a = lease.action
            # (a hedge may start while the other attempt runs: then the state stays RUNNING)
            stamp = hlc_pb2.HlcTimestamp(physical_ms=remote.physical_ms, logical=remote.logical)
            st.emit(
                a.workflow,
                E.EVENT_TYPE_ACTION_STARTED,
                a,
                action_state=t.RUNNING,
                worker_id=w.worker_id,
                lease_id=lease.lease_id,
                worker_hlc=stamp,
            )


def observe_hlc(
    st: SchedulerState, w: WorkerRecord, msg: wpb.ConnectRequest, out: Outcome
) -> HlcTimestamp:
    """Merges the worker's HLC unless it is too far ahead (then counts it)."""
    remote = HlcTimestamp(msg.hlc.physical_ms, msg.hlc.logical)
    w.last_hlc = remote
    try:
        st.hlc.observe(remote)
    except ClockOffsetError as e:
        w.clock_rejections += 1
        out.observe("clock_offset", worker_id=w.worker_id, value=e.offset_ms)
    return remote


def may_replace(old: WorkerRecord, s: WorkerMessageReceived) -> bool:
    """Whether a new stream may take over a live session of the same worker id.

    Only a stream authenticated as that worker (its certificate or token names it) or one
    that presents the live session's resume token (the same worker process reconnecting before
    the old stream's death was noticed). Anyone else could otherwise evict a worker and adopt
    its leases just by saying its name.
    """
    hello = s.message.hello
    if s.identity and s.identity == hello.worker_id:
        return True
    token = hello.resume_token
    return bool(token) and bool(old.resume_token) and hmac.compare_digest(token, old.resume_token)


def on_hello(st: SchedulerState, s: WorkerMessageReceived, out: Outcome) -> None:
    """Welcomes a worker: re-adopts what it still runs, kills what it must not."""
    msg = s.message
    session_id = s.session_id
    hello = msg.hello
    revoked = st.revoked.get(hello.worker_id)
    if revoked is not None:
        out.close(session_id, code_pb2.PERMISSION_DENIED, revoked.refusal(hello.worker_id))
        out.observe("hello_refused", worker_id=hello.worker_id, detail=s.peer)
        return
    old = st.workers.get(hello.worker_id)
    if old is not None and old.connected:
        if not may_replace(old, s):
            out.close(
                session_id,
                code_pb2.ALREADY_EXISTS,
                f"worker id {hello.worker_id!r} is connected (session {old.session_id}); a new"
                " stream may replace it only when authenticated as that worker or with the"
                " live session's resume token",
            )
            out.observe("hello_refused", worker_id=hello.worker_id, detail=s.peer)
            return
        # The same worker, proven, reconnecting before the old stream's death was noticed.
        st.by_session.pop(old.session_id, None)
        out.close(
            old.session_id,
            code_pb2.ABORTED,
            f"replaced by session {session_id} of worker {hello.worker_id!r}"
            + (f" from {s.peer}" if s.peer else ""),
        )
    w = WorkerRecord(
        worker_id=hello.worker_id,
        session_id=session_id,
        hello=hello,
        labels=dict(hello.labels),
        handlers=frozenset(hello.handlers),
        exec_enabled=hello.exec_enabled,
        resources=dict(hello.resources),
        slots=hello.slots,
        free=hello.slots,
        connected_at_wall_ms=st.wall_ms,
        last_renewed=st.now,
        last_seen=st.now,
        resume_token=s.resume_token,
        identity=s.identity,
    )
    st.workers[w.worker_id] = w
    st.by_session[session_id] = w
    liveness.welcomed(st, w)
    observe_hlc(st, w, msg, out)
    if old is not None:
        w.clock_rejections = old.clock_rejections
        _lose_unreported(st, old, hello, out)
    welcome_msg = wpb.ConnectResponse()
    welcome = welcome_msg.welcome
    welcome.heartbeat_interval.FromTimedelta(st.config.heartbeat_interval)
    welcome.lease_ttl.FromTimedelta(st.config.lease_ttl)
    welcome.kill_grace.FromTimedelta(st.config.kill_grace)
    welcome.session_id = session_id
    welcome.resume_token = s.resume_token
    welcome.max_clock_offset.FromMilliseconds(st.hlc.max_offset_ms)
    welcome.prefetch = prefetch.welcome(st, w, hello)
    for r in hello.running:
        w.free -= r.slots  # 0 for a finished attempt whose result is not yet acked
        held = st.leases.get(r.lease_id)
        if (
            held is not None
            and held.token == r.fencing_token
            and held.worker.worker_id == w.worker_id
        ):
            held.worker = w
            held.grant_seq = 0
            w.leases[held.lease_id] = held
            for name, amount in held.action.spec.resources.items():  # still in use
                w.used[name] = w.used.get(name, 0.0) + amount
            welcome.adopted.append(r)
        else:
            welcome.kill.append(r)
    # `free` may start negative (a worker that came back with fewer slots than it still runs):
    # its credits pay the deficit off before anything new is leased.
    out.send(session_id, welcome_msg)
    out.observe("worker_connected", worker_id=w.worker_id)


def _lose_unreported(st: SchedulerState, old: WorkerRecord, hello: wpb.Hello, out: Outcome) -> None:
    """Loses the leases of the worker's previous session that its new Hello does not list."""
    reported = {r.lease_id for r in hello.running}
    replayed = old.session_id == ""  # known only from the journal: we restarted
    # The same worker process, back on a new stream (it presents its last session's resume
    # token): it keeps every lease it got until the lease's result is acked, so one it does not
    # list, and never reported started, it never had (the old stream broke with the grant in
    # flight). A restarted process has no token: what it does not list is charged as before.
    token = hello.resume_token
    same = bool(token) and bool(old.resume_token) and hmac.compare_digest(token, old.resume_token)
    for lease in list(old.leases.values()):
        if lease.lease_id in reported:
            continue
        if replayed and not lease.started:
            # Journalled, then the coordinator stopped before (or while) sending it: the
            # worker never had it. Not the worker's fault, so not charged to the budget.
            why = E.EVENT_REASON_UNDELIVERED
            lose_lease(st, lease, why, UNDELIVERED, out, cancel=False)
        elif same and not lease.started:
            why = E.EVENT_REASON_UNDELIVERED
            lose_lease(st, lease, why, UNDELIVERED_STREAM, out, cancel=False)
        else:  # (if its ACTION_STARTED is journalled, the worker had it, and dropped it)
            why, words = E.EVENT_REASON_NOT_READOPTED, "worker reconnected without it"
            lose_lease(st, lease, why, words, out, cancel=False)


def on_heartbeat(st: SchedulerState, w: WorkerRecord, hb: wpb.Heartbeat, out: Outcome) -> None:
    """Renews every lease the worker holds and reconciles both ways."""
    w.last_renewed = st.now
    w.reported_free = hb.free_slots
    # An idle worker's heartbeat (none held, none reported) has nothing to reconcile.
    reported = {r.lease_id: r.fencing_token for r in hb.leases} if hb.leases else {}
    for lease in list(w.leases.values()) if w.leases else ():
        if lease.lease_id not in reported and lease.grant_seq <= hb.last_grant_sequence:
            # Granted, delivered (by sequence), yet not held: the worker never ran it.
            lose_lease(
                st,
                lease,
                E.EVENT_REASON_NOT_REPORTED,
                "worker did not report the lease",
                out,
                cancel=False,
                restore_credit=True,
            )
    for lease_id, token in reported.items():
        if lease_id in w.leases:
            continue
        a = action_for_lease_id(st, lease_id)
        if a is not None and a.committed_token == token:
            continue  # finished; its ack is on the way
        if a is not None and a.token > token:
            why, words = R.CANCEL_REASON_SUPERSEDED, f"superseded by token {a.token}"
        elif a is not None:
            why, words = R.CANCEL_REASON_UNKNOWN_LEASE, "this lease has ended"
        else:
            why, words = R.CANCEL_REASON_UNKNOWN_LEASE, "the coordinator knows no such lease"
        cancel = wpb.ConnectResponse()
        cancel.cancel_lease.leases.add(
            lease_id=lease_id, fencing_token=token, reason=why, message=words
        )
        out.send(w.session_id, cancel)
    liveness.heartbeat(st, w, hb)
    out.ack(w.session_id).heartbeat_sequence = hb.sequence


def on_stream_closed(st: SchedulerState, s: WorkerStreamClosed, out: Outcome) -> None:
    w = st.by_session.get(s.session_id)
    if w is not None:
        end_session(st, w, out)


def close_silent(st: SchedulerState, out: Outcome) -> None:
    """Closes sessions that sent nothing for a lease TTL (their streams end with UNAVAILABLE)."""
    for w in liveness.close_silent(st, out):
        end_session(st, w, out)


def end_session(st: SchedulerState, w: WorkerRecord, out: Outcome) -> None:
    """The session's stream ended (or is being closed): its leases keep their TTL unless the
    worker said goodbye, and a worker without leases is forgotten."""
    st.by_session.pop(w.session_id, None)
    w.connected = False
    out.observe("worker_disconnected", worker_id=w.worker_id)
    if w.said_goodbye:
        for lease in list(w.leases.values()):
            lose_lease(st, lease, E.EVENT_REASON_WORKER_LEFT, "worker left", out, cancel=False)
    # Otherwise its leases keep their TTL: the worker may come back and re-adopt them.
    if not w.leases and st.workers.get(w.worker_id) is w:
        del st.workers[w.worker_id]


def on_drain(st: SchedulerState, s: DrainRequested, out: Outcome) -> None:
    w = st.workers.get(s.worker_id)
    if w is None or not w.connected:
        out.reply(s.reply, KeyError(s.worker_id))
        return
    w.draining = True
    msg = wpb.ConnectResponse()
    msg.drain.reason = "drain requested by an operator"
    out.send(w.session_id, msg)
    out.reply(s.reply, True)
