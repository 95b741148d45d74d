"""gather: joins every work-N branch's outputs, checks nothing is missing, writes the total."""

from __future__ import annotations

import sys

from plait_io import read_inputs, write_outputs

inputs = read_inputs()
needs = inputs["needs"]
branches = {k: v for k, v in needs.items() if k.startswith("work-")}
failed = sorted(k for k, v in branches.items() if v.get("state") != "ACTION_STATE_SUCCEEDED")
if failed:
    sys.exit(f"branches did not succeed: {', '.join(failed)}")
total = sum(v["outputs"]["sum_of_squares"] for v in branches.values())
count = sum(v["outputs"]["count"] for v in branches.values())
n = count
expected = n * (n + 1) * (2 * n + 1) // 6
if total != expected:
    sys.exit(f"total {total} != expected {expected}: a shard is wrong")
write_outputs({"branches": len(branches), "numbers": count, "total": total})
print(f"gathered {len(branches)} branches: sum of squares of 1..{count} = {total}")
