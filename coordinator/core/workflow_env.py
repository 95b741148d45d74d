"""The workflow-wide environment, added to each exec lease (pure core, lease aggregate).

``WorkflowSpec.env`` is sent and journalled once per workflow instead of once per action (the
YAML loader puts ``PLAIT_WORKFLOW_DIR`` there: 56 bytes that once went into each of 100,000
actions). A lease carries its action's spec, so the coordinator adds the workflow's variables
to that copy as it grants it, beneath the action's own: a key the action sets in ``env`` or
names in ``secrets`` keeps the action's. Handler actions get nothing, as before. Workers see
one ``action.env``, as they always have, so none of them changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from plait.v1 import workflow_pb2 as pb

__all__ = ["ENTRY_OVERHEAD_BYTES", "add_workflow_env", "workflow_env_bytes"]

# A map entry's wire overhead beyond its key and value: the entry's tag and length, the key's
# and the value's tags and lengths (each length a varint of at most 3 bytes under 2 MiB).
ENTRY_OVERHEAD_BYTES = 12


def workflow_env_bytes(env: Mapping[str, str]) -> int:
    """At most how many bytes ``env`` adds to a lease's action spec (0 for none)."""
    if not env:
        return 0
    return sum(len(k.encode()) + len(v.encode()) + ENTRY_OVERHEAD_BYTES for k, v in env.items())


def add_workflow_env(action: pb.ActionSpec, env: Mapping[str, str]) -> None:
    """Adds ``env`` to ``action`` (a lease's copy) and to its exec pipeline stages, beneath
    each one's own ``env`` and ``secrets``."""
    if not env:
        return
    for runs in (action, *action.pipeline.stages):
        if runs.WhichOneof("kind") != "exec":
            continue
        own, secrets = runs.env, runs.secrets
        for key, value in env.items():
            if key not in own and key not in secrets:
                own[key] = value
