"""pick: the join of a race. Receives every mirror's outcome; uses the one that succeeded."""

from __future__ import annotations

import sys

from plait_io import read_inputs, write_outputs

needs = read_inputs()["needs"]
won = [k for k, v in needs.items() if v.get("state") == "ACTION_STATE_SUCCEEDED"]
if not won:
    sys.exit("no mirror succeeded")
states = {k: v.get("state", "?").removeprefix("ACTION_STATE_") for k, v in needs.items()}
write_outputs({"winner": won[0], "states": states})
print(f"using {won[0]}; outcomes: {states}")
