"""The handlers every worker under conformance test serves, in Python (tests layer).

Served by ``plait workerd --handlers tests.conformance.handlers:worker`` and by
:mod:`tests.conformance.python_worker`; a worker in another language serves the same four
names with the same behaviour (tests/conformance/README.md):

- ``echo``: outputs ``{"value": input}``, the action's static input as given;
- ``sleep``: sleeps ``input.seconds``, then outputs ``{"slept": seconds}``; stops at once when
  its attempt is cancelled; an ``input.seconds`` that is not a number fails the attempt;
- ``fail``: fails with the typed error ``input.type`` and message ``input.message``;
- ``progress``: reports progress every 100 ms for ``input.seconds``, then outputs
  ``{"reports": n}``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import plait

worker = plait.Worker()

PROGRESS_EVERY_S = 0.1


def _seconds(ctx: plait.ActionContext) -> float:
    raw = ctx.input.get("seconds") if isinstance(ctx.input, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError(f"input.seconds must be a non-negative number, got {raw!r}")
    return float(raw)


@worker.action("echo")
def echo(ctx: plait.ActionContext) -> dict[str, Any]:
    """Outputs its input unchanged."""
    return {"value": ctx.input}


@worker.action("sleep")
async def sleep(ctx: plait.ActionContext) -> dict[str, Any]:
    """Sleeps; a cancel cancels the task (and so the sleep)."""
    seconds = _seconds(ctx)
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@worker.action("fail")
def fail(ctx: plait.ActionContext) -> dict[str, Any]:
    """Fails with the error type and message its input names."""
    spec = ctx.input if isinstance(ctx.input, dict) else {}
    raise plait.ActionError(str(spec.get("message", "")), type=str(spec.get("type", "")))


@worker.action("progress")
async def progress(ctx: plait.ActionContext) -> dict[str, Any]:
    """Reports progress every 100 ms for ``input.seconds``."""
    seconds = _seconds(ctx)
    began = time.monotonic()
    reports = 0
    while (elapsed := time.monotonic() - began) < seconds:
        ctx.heartbeat({"elapsed_s": round(elapsed, 3), "reports": reports})
        reports += 1
        await asyncio.sleep(PROGRESS_EVERY_S)
    return {"reports": reports}
