"""Handlers for the benchmarks: ``workerd --handlers tests.bench.noop_handlers:worker``."""

from __future__ import annotations

import asyncio
from typing import Any

import plait

worker = plait.Worker()


@worker.action("noop")
async def noop(ctx: Any) -> dict[str, Any]:
    """Does nothing, so the benchmark measures Plait's own overhead."""
    return {}


@worker.action("sleep10ms")
async def sleep10ms(ctx: Any) -> dict[str, Any]:
    """Waits 10 ms without holding the loop: the sleep shape measures dispatch latency."""
    await asyncio.sleep(0.01)
    return {}
