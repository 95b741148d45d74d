"""Handlers for the size benchmark: ``workerd --handlers tests.bench.size_handlers:worker``."""

from __future__ import annotations

from typing import Any

import plait

worker = plait.Worker()


@worker.action("sized")
async def sized(ctx: Any) -> dict[str, Any]:
    """Returns outputs of about ``input.bytes`` bytes (``{"blob": "xxx..."}``)."""
    n = int((ctx.input or {}).get("bytes", 0))
    return {"blob": "x" * n} if n else {"n": 0}
