"""replica: writes to one replica; ``fail: true`` makes this replica refuse (exit 3)."""

from __future__ import annotations

import sys
import time

from plait_io import read_inputs, write_outputs

params = read_inputs()["input"]
time.sleep(0.1)
if params.get("fail"):
    print(f"replica {params['replica']} is read-only", file=sys.stderr)
    sys.exit(3)
write_outputs({"replica": params["replica"], "version": 7})
print(f"wrote to {params['replica']}")
