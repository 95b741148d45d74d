"""plan: produces the list the map fans out over, ``{"numbers": [1, ..., count]}``."""

from __future__ import annotations

from plait_io import read_inputs, write_outputs

count = int((read_inputs()["input"] or {}).get("count", 10))
write_outputs({"numbers": list(range(1, count + 1))})
print(f"planned {count} items")
