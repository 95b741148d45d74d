"""mirror: "downloads" from one mirror after ``delay`` seconds; ``fail: true`` makes it fail."""

from __future__ import annotations

import sys
import time

from plait_io import read_inputs, write_outputs

params = read_inputs()["input"]
time.sleep(float(params.get("delay", 0)))
if params.get("fail"):
    sys.exit(f"mirror {params['mirror']} is unreachable")
write_outputs({"mirror": params["mirror"], "bytes": 1024})
print(f"fetched from {params['mirror']}")
