"""Retention (edge layer): finished workflows past ``--retention`` are forgotten by the core and
their journal rows pruned in the background, at most once a minute (a tenth of the retention
when that is shorter)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container

from plait.clock import Clock
from plait.coordinator.core.state import SchedulerState
from plait.coordinator.journal.store import JournalStore

log = logging.getLogger("plait.coordinator.runtime")
EVERY = 60.0  # seconds between sweeps, at most


class Retention:
    """Decides when a sweep is due and runs it."""

    def __init__(self, retention_s: float, store: JournalStore, clock: Clock) -> None:
        self.retention_s = retention_s
        self.store = store
        self.clock = clock
        self.next_at = 0.0

    def due(self, now: float) -> bool:
        """Whether a sweep is due at monotonic ``now`` (then the next one is scheduled)."""
        if now < self.next_at:
            return False
        self.next_at = now + min(EVERY, self.retention_s / 10)
        return True

    def sweep(self, core: SchedulerState, watched: Container[str]) -> None:
        """Forgets finished workflows past retention (not ``watched`` ones) and prunes their
        rows in the background."""
        horizon = self.clock.wall_ms() - int(self.retention_s * 1000)
        old = [
            wf.workflow_id
            for wf in core.workflows.values()
            if wf.finished_wall_ms
            and wf.finished_wall_ms < horizon
            and wf.workflow_id not in watched
        ]
        if old:
            core.forget(old)
            task = asyncio.create_task(self.store.prune(old), name="plait-prune")
            task.add_done_callback(_log_prune)


def _log_prune(task: asyncio.Task[int]) -> None:
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error("pruning finished workflows failed: %s", err)
    else:
        log.info("pruned %d journal rows of finished workflows", task.result())
