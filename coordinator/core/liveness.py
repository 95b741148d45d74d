"""Liveness both ways: which worker sessions may be leased new work (pure core).

Leases are safe without this module (fencing tokens, and the worker's self-fence, see to that).
It keeps new work away from sessions that would only lose it:

* **Hearing.** A session is leased new work only while its worker has proved, recently, that it
  hears the coordinator. Each heartbeat echoes the newest ``Ack.heartbeat_sequence`` its worker
  received on the stream (``Heartbeat.last_ack_sequence``; 0 means only the ``Welcome``, and a
  worker sends no heartbeat before it has the ``Welcome``). The coordinator remembers when it
  sent each ack, so the echo proves the worker heard something sent at that time. The proof
  counts for :data:`HEAR_WINDOW` heartbeat intervals. So a stream whose ``Welcome`` never arrived
  (coordinator-to-worker traffic lost) is never leased to; one that goes deaf stops being
  leased to within three intervals, well before its worker self-fences (``lease_ttl`` is at
  least five); and a coordinator that was itself paused finds every proof stale and waits for
  fresh heartbeats instead of granting to sessions their workers may have abandoned.
* **Not straight back.** An action whose lease was lost is not leased again to the worker that
  lost it while another worker that may be leased to has a free slot it fits.
* **Held back.** A worker id that loses leases in a row (expired, self-fenced, not re-adopted,
  not reported) is held back from new leases for 2 x ``heartbeat_interval`` after the second
  loss, doubling with each further loss up to 4 x ``lease_ttl``. A success ends the streak.
  This state is kept per worker id across its sessions, but not across a coordinator restart.
* **Silent sessions** (no message at all for a lease TTL) are closed with UNAVAILABLE.

Like the rest of the core this does no I/O and reads no clock: ``st.now`` is the batch's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.rpc import code_pb2

from plait.coordinator.core import limits
from plait.coordinator.core.model import ActionRecord, Outcome, WorkerRecord
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb

if TYPE_CHECKING:
    from plait.coordinator.core.state import SchedulerState

E = pb  # EVENT_REASON_* as module constants

HEAR_WINDOW = 3  # heartbeat intervals a proof of hearing counts for
QUIET_TTLS = 10  # lease TTLs a worker that lost a lease gets no prefetch for
ACKS_KEPT = 8  # recent heartbeat acks remembered per session (an echo names one of them)
# Lease losses that say the worker itself is unreliable right now; the others (revoked,
# undelivered after a coordinator restart, a hedge ending, a worker leaving on purpose) do not.
FLAPS: frozenset[int] = frozenset(
    {
        E.EVENT_REASON_LEASE_EXPIRED,
        E.EVENT_REASON_NOT_READOPTED,
        E.EVENT_REASON_SELF_FENCED,
        E.EVENT_REASON_NOT_REPORTED,
    }
)


@dataclass(slots=True)
class Streak:
    """Leases one worker id lost in a row, and until when it is held back for them."""

    losses: int = 0
    held_until: float = -math.inf  # monotonic


def welcomed(st: SchedulerState, w: WorkerRecord) -> None:
    """The session's ``Welcome`` goes out now: an echo of 0 proves the worker heard it."""
    w.welcomed_at = st.now
    w.proof_at = -math.inf


def heartbeat(st: SchedulerState, w: WorkerRecord, hb: wpb.Heartbeat) -> None:
    """Takes the heartbeat's echo as proof of hearing, then remembers its own ack's time."""
    # Once per heartbeat of every worker: plain loops and comparisons, no generator.
    echoed = hb.last_ack_sequence
    acks = w.acks
    if not echoed:
        sent = w.welcomed_at
    else:
        sent = -math.inf
        for seq, at in acks:
            if seq == echoed:
                sent = at
                break
    w.proof_at = max(w.proof_at, sent)
    if len(acks) >= ACKS_KEPT:
        del acks[0]
    acks.append((hb.sequence, st.now))


def hears(st: SchedulerState, w: WorkerRecord) -> bool:
    """Whether the worker proved, recently enough, that it hears this session."""
    return st.now - w.proof_at <= st.hear_window


def may_lease(st: SchedulerState, w: WorkerRecord) -> bool:
    """Whether new leases may go to ``w`` now (slots aside)."""
    if not w.connected or w.draining or st.now - w.proof_at > st.hear_window:
        return False
    streak = st.streaks.get(w.worker_id)
    return streak is None or streak.held_until <= st.now


def held_back_for(st: SchedulerState, worker_id: str) -> float:
    """Seconds the worker id is still held back from new leases (0 when it is not)."""
    streak = st.streaks.get(worker_id)
    return max(0.0, streak.held_until - st.now) if streak is not None else 0.0


def lost(st: SchedulerState, worker_id: str, why: int) -> None:
    """A lease of ``worker_id`` was lost for ``why``: extends its streak and holds it back."""
    if why not in FLAPS:
        return
    st.no_prefetch_until[worker_id] = st.now + QUIET_TTLS * st.ttl  # (core.prefetch)
    streak = st.streaks.get(worker_id)
    if streak is None:
        streak = st.streaks[worker_id] = Streak()
    streak.losses += 1
    if streak.losses < 2:
        return  # one loss may be bad luck: the action only avoids this worker (avoid())
    base = 2 * st.config.heartbeat_interval.total_seconds()
    hold = min(base * 2 ** min(streak.losses - 2, 30), 4 * st.ttl)
    streak.held_until = max(streak.held_until, st.now + hold)


def succeeded(st: SchedulerState, worker_id: str) -> None:
    """A result of ``worker_id`` committed: its streak of losses is over."""
    st.streaks.pop(worker_id, None)


def forget_streaks(st: SchedulerState) -> None:
    """Drops streaks of workers that are gone and no longer held back (bounds the table)."""
    now = st.now
    for worker_id in [
        wid
        for wid, streak in st.streaks.items()
        if streak.held_until + 4 * st.ttl < now and wid not in st.workers
    ]:
        del st.streaks[worker_id]


def avoid(st: SchedulerState, a: ActionRecord, w: WorkerRecord) -> bool:
    """Whether ``a`` should wait for another worker than ``w``, which just lost its lease."""
    if a.lost_by != w.worker_id:
        return False
    return any(
        v is not w and v.free > 0 and may_lease(st, v) and limits.fits(st, a, v)
        for v in st.workers.values()
    )


def close_silent(st: SchedulerState, out: Outcome) -> list[WorkerRecord]:
    """Closes every connected session that sent nothing for a lease TTL; returns them."""
    now, ttl = st.now, st.ttl
    silent = [w for w in st.by_session.values() if now - w.last_seen > ttl]
    for w in silent:
        out.close(
            w.session_id,
            code_pb2.UNAVAILABLE,
            f"no message from worker {w.worker_id!r} for {now - w.last_seen:.3g}s (lease TTL"
            f" {ttl:g}s): the session is closed; reconnect to go on",
        )
    return silent
