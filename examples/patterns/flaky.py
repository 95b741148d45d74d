"""flaky: fails with exit code 75 (EX_TEMPFAIL) on its first ``fail_times`` attempts."""

from __future__ import annotations

import os
import sys

from plait_io import read_inputs, write_outputs

params = read_inputs()["input"] or {}
attempt = int(os.environ.get("PLAIT_ATTEMPT", "1"))
if attempt <= int(params.get("fail_times", 1)):
    print(f"attempt {attempt}: temporarily unavailable", file=sys.stderr)
    sys.exit(75)
write_outputs({"attempt": attempt})
print(f"attempt {attempt} succeeded")
