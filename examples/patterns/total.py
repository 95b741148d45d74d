"""total: the gather. ``square`` is a map action: its outputs are ``{"items": [...]}``, each
child's outputs in list order (null where a child did not succeed)."""

from __future__ import annotations

import sys

from plait_io import read_inputs, write_outputs

items = read_inputs()["needs"]["square"]["outputs"]["items"]
if any(i is None for i in items):
    sys.exit("a child did not succeed")
total = sum(i["square"] for i in items)
n = len(items)
if total != n * (n + 1) * (2 * n + 1) // 6:
    sys.exit(f"sum of squares {total} is wrong")
write_outputs({"items": n, "sum_of_squares": total})
print(f"sum of squares of 1..{n} = {total}")
