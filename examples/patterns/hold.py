"""hold: proves mutual exclusion. While it runs it holds a marker file named after the lock;
finding the marker already there means another action holds the lock too, and it fails."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from plait_io import read_inputs, write_outputs

params = read_inputs()["input"]
workflow = os.environ.get("PLAIT_WORKFLOW_ID", "local")
marker = Path("/tmp") / f"plait-example-{workflow}-{params['lock']}.held"
try:
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    sys.exit(f"{marker} exists: someone else holds {params['lock']!r}")
try:
    os.write(fd, os.environ.get("PLAIT_ACTION_ID", "?").encode())
    time.sleep(float(params.get("hold", 0.2)))
finally:
    os.close(fd)
    marker.unlink()
write_outputs({"lock": params["lock"], "held_for": params.get("hold", 0.2)})
print(f"held {params['lock']} alone")
