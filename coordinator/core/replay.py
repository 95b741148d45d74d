"""Rebuilding the scheduling core from its journal (pure core): apply, and nothing else.

A restarted (or newly elected) coordinator folds every journalled event, in sequence order,
through :func:`~plait.coordinator.core.apply.apply`, the same function the live core applies
each event it decides with. Nothing is decided and nothing is recorded. What was live when the
previous writer stopped comes back as it was, with two deliberate differences:

* every live lease gets a fresh TTL (and progress wait) from the replay instant: its worker
  could not reach us while we were down, which says nothing about whether it is alive;
* its holder appears as a disconnected worker, so the worker's reconnect (``Hello.running``)
  re-adopts the lease when its fencing token is current, and expiry re-queues it otherwise.

Timers are state that ``apply`` arms, given the time the event happened: its wall-clock age at
the replay instant, taken off the replay instant's monotonic time. So a queue timeout, run
timeout, hedge threshold, workflow deadline or retry backoff that was running when the previous
writer stopped ends when it would have (or at once, if that is past).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

from plait.coordinator.core.apply import apply
from plait.coordinator.core.events import Instant
from plait.coordinator.core.state import SchedulerState
from plait.v1 import workflow_pb2 as pb


def replay(st: SchedulerState, events: Iterable[pb.HistoryEvent], at: Instant) -> int:
    """Folds ``events`` (in sequence order) into ``st``; returns how many were applied.

    The cyclic garbage collector is paused while they are: everything replay makes lives on
    (records, leases, timers), so each collection would scan the whole growing state for no
    garbage: that was about a quarter of a replay's CPU time.
    """
    clock = st._clock
    clock.wall, clock.mono = at.wall_ms, at.monotonic
    st.now = at.monotonic
    durable = st.outputs.cache.durable
    n = 0
    collecting = gc.isenabled()
    gc.disable()
    try:
        for ev in events:
            sequence = ev.sequence
            if sequence <= st.sequence:
                raise ValueError(f"journal out of order: {sequence} after {st.sequence}")
            st.sequence = sequence
            apply(st, ev, happened_at(ev, at))
            durable()  # replayed events are in the journal already
            n += 1
    finally:
        if collecting:
            gc.enable()
    return n


def happened_at(ev: pb.HistoryEvent, at: Instant) -> float:
    """When ``ev`` happened on the monotonic clock of the replay instant ``at``.

    Its wall-clock age (never negative: a wall clock set back makes it now) taken off ``at``.
    """
    rec = ev.recorded_at  # Timestamp.ToMilliseconds without its checks: once per event here
    recorded_ms = rec.seconds * 1000 + rec.nanos // 1_000_000
    if recorded_ms == 0 and not ev.HasField("recorded_at"):  # (asked only of a zero stamp)
        return at.monotonic
    age_ms = at.wall_ms - recorded_ms
    return at.monotonic - age_ms / 1000 if age_ms > 0 else at.monotonic
