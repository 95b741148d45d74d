"""list: publishes the images to resize as outputs, ``{"images": [...]}``."""

from __future__ import annotations

from plait_io import read_inputs, write_outputs

params = read_inputs()["input"] or {}
count = int(params.get("count", 12))
images = [f"img-{i:02d}.pgm" for i in range(count)]
write_outputs({"images": images})
print(f"listed {len(images)} images")
