"""Carrying live worker sessions over to a core rebuilt from the journal (pure core).

When handling a stimulus raises an unexpected exception, the in-memory state may be half
applied (a lease dropped but the action not finished, say) and nothing of that batch was
committed. The runtime then rebuilds the core from the journal, which is exactly the last
consistent state, and carries every live worker session over, so that only the stream or RPC
whose stimulus failed ends:

* each live session says ``hello`` again on the rebuilt core, listing the leases the old core
  gave it; :func:`~plait.coordinator.core.workers.on_hello` re-adopts those the journal agrees
  on (tokens current, same worker) and gives up, uncharged, journalled leases the old memory
  had lost (the worker's next heartbeat reconciles both ways, as after any reconnect);
* the Welcome those hellos produce is not sent (the stream is already welcomed), and a
  placeholder report of the slots not yet credited back keeps the batch from granting;
* :func:`carry_over` then restores what the journal does not hold: credits, grant sequence
  numbers (heartbeats compare against them), drain and goodbye flags, last-seen times, and
  each adopted lease's grant sequence, start and progress times.

Like the rest of the core this does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from plait.coordinator.core.events import WorkerMessageReceived
from plait.coordinator.core.model import Outcome, WorkerRecord
from plait.coordinator.core.state import SchedulerState
from plait.v1 import worker_service_pb2 as wpb


def rehellos(old: SchedulerState, session_ids: Iterable[str]) -> list[WorkerMessageReceived]:
    """A ``hello`` per live session, as it would say it now: its leases, no free slot."""
    out = []
    for session_id in session_ids:
        w = old.by_session.get(session_id)
        if w is None:
            continue
        msg = wpb.ConnectRequest()
        msg.hlc.physical_ms, msg.hlc.logical = w.last_hlc
        hello = msg.hello
        hello.CopyFrom(w.hello)
        del hello.running[:]
        held = 0
        for lease in w.leases.values():
            hello.running.add(lease_id=lease.lease_id, fencing_token=lease.token, slots=lease.slots)
            held += lease.slots
        hello.slots = w.slots
        if w.slots > held:
            # No lease has an empty id: on_hello lists this report as one to kill (in the
            # Welcome, which is not sent) and takes its slots off the initial credit.
            hello.running.add(lease_id="", fencing_token=0, slots=w.slots - held)
        out.append(
            WorkerMessageReceived(
                f"rebuild-{w.worker_id}",
                session_id,
                msg,
                identity=w.identity,
                resume_token=w.resume_token,
            )
        )
    return out


def drop_welcomes(out: Outcome, session_ids: Iterable[str]) -> None:
    """Removes the Welcome messages of re-attached sessions from ``out``."""
    for session_id in session_ids:
        msgs = out.sends.get(session_id)
        if msgs:
            msgs[:] = [m for m in msgs if not m.HasField("welcome")]


def carry_over(old: SchedulerState, new: SchedulerState, session_ids: Iterable[str]) -> None:
    """Restores the per-session state the journal does not hold (see the module docstring)."""
    new.streaks = dict(old.streaks)
    for session_id in session_ids:
        before = old.by_session.get(session_id)
        after = new.by_session.get(session_id)
        if before is None or after is None:
            continue
        _carry_worker(before, after)


def _carry_worker(before: WorkerRecord, after: WorkerRecord) -> None:
    after.free = min(after.slots, before.free)
    after.grant_seq = before.grant_seq
    after.draining = before.draining
    after.said_goodbye = before.said_goodbye
    after.last_renewed = before.last_renewed
    after.last_seen = before.last_seen
    after.clock_rejections = before.clock_rejections
    after.connected_at_wall_ms = before.connected_at_wall_ms
    after.welcomed_at, after.proof_at = before.welcomed_at, before.proof_at
    after.acks = list(before.acks)
    after.depth, after.mean_run = before.depth, before.mean_run
    used: dict[str, float] = {}
    for lease_id, lease in after.leases.items():
        prior = before.leases.get(lease_id)
        if prior is not None and prior.token == lease.token:
            lease.grant_seq = prior.grant_seq
            lease.granted_at = prior.granted_at
            lease.started = lease.started or prior.started
            lease.last_progress = prior.last_progress
            lease.reclaiming = prior.reclaiming
        for name, amount in lease.action.spec.resources.items():
            used[name] = used.get(name, 0.0) + amount
    after.used = used
