"""work-N: sums the squares of shard N's numbers (1..items, every shards-th) and reports it."""

from __future__ import annotations

import time

from plait_io import read_inputs, write_outputs

inputs = read_inputs()
plan = inputs["needs"]["split"]["outputs"]
shard = int(inputs["input"]["shard"])
numbers = range(1 + shard, plan["items"] + 1, plan["shards"])
total = sum(n * n for n in numbers)
time.sleep(0.2 + 0.02 * shard)  # a fraction of a second of "work", so the fan-out is visible
write_outputs({"shard": shard, "count": len(numbers), "sum_of_squares": total})
print(f"shard {shard}: {len(numbers)} numbers, sum of squares {total}")
