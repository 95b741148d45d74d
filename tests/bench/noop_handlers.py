"""Handlers for the benchmarks: ``workerd --handlers tests.bench.noop_handlers:worker``."""

from __future__ import annotations

from typing import Any

import plait

worker = plait.Worker()


@worker.action("noop")
async def noop(ctx: Any) -> dict[str, Any]:
    """Does nothing, so the benchmark measures Plait's own overhead."""
    return {}
