"""What clients and workers may send, as numbers (foundation layer).

:class:`Limits` is pure data. The coordinator's configuration loads it from flags, ``PLAIT_*``
variables and TOML (``coordinator/config.py``); its core validates submissions and results
against it; and the client checks a workflow against the defaults before it sends anything
(``plait validate``), through the same :mod:`plait.spec.validate`. It lives in the foundation so
that both sides of the wire read one set of numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.jsonlimits import MAX_JSON_DEPTH, MAX_OUTPUT_BYTES

__all__ = ["LEASE_HEADROOM_BYTES", "MAX_MESSAGE_BYTES", "Limits"]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LEASE_HEADROOM_BYTES = 256 * 1024  # a grant message's room beside its leases' inputs and specs


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on what clients and workers may send (docs/operations.md, "Input limits").

    Counts are entries of one list or map; ``*_bytes`` are UTF-8 bytes (keys and values of a
    map together). Every one has a flag (``--max-json-depth``) and a ``PLAIT_*`` variable.
    """

    max_actions: int = 100_000
    # A whole WorkflowSpec, serialized; one larger than the message limit travels in pieces
    # (SubmitWorkflowStream), so this, not max_message_bytes, bounds a submission.
    max_spec_bytes: int = 64 * 1024 * 1024
    max_edges: int = 1_000_000
    max_fan_in: int = 10_000
    max_depth: int = 10_000
    max_input_bytes: int = 1024 * 1024
    # Workers refuse larger outputs themselves (the SDK and workerd check MAX_OUTPUT_BYTES), so
    # this may be lowered, never raised (CoordinatorConfig.validate).
    max_output_bytes: int = MAX_OUTPUT_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_json_depth: int = MAX_JSON_DEPTH  # input_json, outputs_json, details_json
    max_progress_bytes: int = 64 * 1024  # one LeaseProgress.details_json
    max_tail_bytes: int = 64 * 1024  # ActionResult.stdout_tail / stderr_tail (kept: the end)
    max_error_bytes: int = 16 * 1024  # ActionResult.error (message and details)
    max_argv: int = 4096  # ExecAction.argv entries
    max_argv_bytes: int = 256 * 1024
    max_env: int = 1024  # ActionSpec.env entries
    max_env_bytes: int = 256 * 1024
    max_labels: int = 256  # WorkflowSpec.labels, ActionSpec.selector, Hello.labels entries
    max_label_bytes: int = 64 * 1024
    max_resources: int = 256  # ActionSpec.resources, Hello.resources entries
    max_semaphores: int = 256  # ActionSpec.semaphores entries
    # A lease's inputs (its needs' outputs) plus its action spec; larger fails the action at
    # grant time. Default: the message limit less room for the rest of a grant message.
    max_lease_bytes: int = MAX_MESSAGE_BYTES - LEASE_HEADROOM_BYTES
