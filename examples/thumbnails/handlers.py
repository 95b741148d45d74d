"""The ``build-index`` handler of examples/thumbnails.yaml, served by an SDK worker.

    plait run examples/thumbnails.yaml --handlers examples/thumbnails/handlers.py

``resize`` is a map action: its outputs are ``{"items": [...]}``, one entry per image in list
order, holding that child's outputs, or null where the child did not succeed. The index lists
the thumbnails made and names the children that did not make one, so partial success is explicit.
"""

from __future__ import annotations

from typing import Any

import plait

worker = plait.Worker()


@worker.action("build-index")
def build_index(ctx: plait.ActionContext) -> dict[str, Any]:
    """Indexes every thumbnail ``resize`` made; names the children that made none."""
    children = ctx.needs["resize"].outputs.get("items", [])
    made = [c for c in children if c]
    index = {c["image"]: {"thumbnail": c["thumbnail"], "checksum": c["checksum"]} for c in made}
    missing = [f"resize.{i}" for i, c in enumerate(children) if not c]
    return {"thumbnails": len(made), "of": len(children), "missing": missing, "index": index}
