"""Handlers for the coordinator-restart system tests, served by ``workerd --handlers``.

``noop`` appends ``workflow action token`` to the file named by ``PLAIT_TEST_MARKS`` (the
workerd's environment) just before it returns: a record of every attempt that ran to completion
on its worker, which the test compares with what the journal committed.
"""

from __future__ import annotations

import os
import threading

import plait

worker = plait.Worker()
_lock = threading.Lock()


@worker.action("noop")
def noop(ctx: plait.ActionContext) -> dict[str, int]:
    """Does nothing, but says so; a cancelled (self-fenced) attempt does not count."""
    path = os.environ.get("PLAIT_TEST_MARKS")
    if path and not ctx.cancelled:
        line = f"{ctx.workflow_id} {ctx.action_id} {ctx.fencing_token}\n"
        with _lock, open(path, "a") as f:
            f.write(line)
    return {"token": ctx.fencing_token}
