"""commit: the quorum's join. Counts the replicas that acknowledged and names those that did not."""

from __future__ import annotations

from plait_io import read_inputs, write_outputs

needs = read_inputs()["needs"]
acked = sorted(k for k, v in needs.items() if v.get("state") == "ACTION_STATE_SUCCEEDED")
lost = sorted(set(needs) - set(acked))
write_outputs({"acked": acked, "lost": lost})
print(f"committed with {len(acked)} of {len(needs)} replicas; not acknowledged: {lost}")
