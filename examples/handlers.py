"""Named handlers for examples/handlers.yaml, served by an SDK worker.

Run the flow with these handlers on local workers::

    plait run examples/handlers.yaml --handlers examples.handlers:worker

or serve them to a long-running coordinator::

    plait workerd --coordinator HOST:PORT --handlers examples.handlers:worker

A handler takes the action's context and returns its outputs (a JSON object): ``ctx.input`` is
the action's static input, ``ctx.needs[id].outputs`` what each upstream action produced,
``ctx.attempt`` the attempt number and ``ctx.fencing_token`` the lease's fencing token.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import plait

worker = plait.Worker()


@worker.action("load-text")
def load_text(ctx: plait.ActionContext) -> dict[str, Any]:
    """Splits the input text into lines: the fork point."""
    lines = [line.strip() for line in str(ctx.input["text"]).splitlines() if line.strip()]
    return {"lines": lines}


@worker.action("count-words")
def count_words(ctx: plait.ActionContext) -> dict[str, Any]:
    """Counts the words of every ``parts``-th line, starting at line ``part``."""
    lines = ctx.needs["load"].outputs["lines"]
    part, parts = int(ctx.input["part"]), int(ctx.input["parts"])
    counts = Counter(
        word.lower().strip(".,;:!?") for line in lines[part::parts] for word in line.split()
    )
    return {"part": part, "counts": dict(counts), "attempt": ctx.attempt}


@worker.action("merge-counts")
def merge_counts(ctx: plait.ActionContext) -> dict[str, Any]:
    """Joins every branch's counts: the join point."""
    total: Counter[str] = Counter()
    for action_id, need in ctx.needs.items():
        if action_id.startswith("count-"):
            total.update(need.outputs["counts"])
    top = [[word, n] for word, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    return {"words": sum(total.values()), "distinct": len(total), "top": top}


@worker.action("fetch-mirror")
def fetch_mirror(ctx: plait.ActionContext) -> dict[str, Any]:
    """Fetches from a mirror that is busy for the first ``busy_attempts`` attempts.

    While busy it raises :class:`plait.ActionError` typed ``RateLimited``: that type, not the
    message, is what ``retry.retryable_errors`` in examples/typed_retry.yaml matches.
    """
    if ctx.attempt <= int(ctx.input.get("busy_attempts", 1)):
        raise plait.ActionError("mirror busy", type="RateLimited")
    return {"url": ctx.input["url"], "attempt": ctx.attempt}
