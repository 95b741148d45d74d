"""split: decides the work -- N numbers cut into S shards -- and publishes the plan as outputs."""

from __future__ import annotations

from plait_io import read_inputs, write_outputs

inputs = read_inputs()
params = inputs["input"] or {}
items = int(params.get("items", 1200))
shards = int(params.get("shards", 12))
write_outputs({"items": items, "shards": shards})
print(f"split {items} numbers into {shards} shards")
