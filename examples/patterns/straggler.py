"""straggler: the first attempt hangs (a slow host); any later attempt is quick."""

from __future__ import annotations

import os
import time

from plait_io import write_outputs

attempt = int(os.environ.get("PLAIT_ATTEMPT", "1"))
time.sleep(60 if attempt == 1 else 0.1)
write_outputs({"attempt": attempt, "token": int(os.environ["PLAIT_FENCING_TOKEN"])})
