"""report: the pipeline's gather. Every item must have gone through every stage, in order."""

from __future__ import annotations

import sys

from plait_io import read_inputs, write_outputs

items = read_inputs()["needs"]["etl"]["outputs"]["items"]
if any(i is None or i["stages"] != ["fetch", "parse", "load"] for i in items):
    sys.exit(f"an item missed a stage: {items}")
write_outputs({"items": len(items)})
print(f"{len(items)} items went through fetch -> parse -> load")
