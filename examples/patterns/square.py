"""square N: one map child. The item arrives in argv (``{{ item }}``) and in the inputs."""

from __future__ import annotations

import sys
import time

from plait_io import item, write_outputs

n = int(sys.argv[1])
if n != item():
    sys.exit(f"argv says {n} but the item is {item()!r}")
time.sleep(0.1)
write_outputs({"n": n, "square": n * n})
