"""Validation of submitted workflow specs (pure core).

The checks live in :mod:`plait.spec.validate`, one implementation that the client runs too
(``plait validate``); the core runs them on every submission through these names.
"""

from __future__ import annotations

from plait.spec.validate import (
    CYCLE_SHOWN,
    MAX_ATTEMPTS,
    MAX_DURATION_S,
    MAX_IDEMPOTENCY_KEY,
    MAX_MULTIPLIER,
    MAX_NAME,
    MAX_PATH_BYTES,
    MAX_RETRY_LIST,
    describe_cycle,
    find_cycle,
    labels_violations,
    longest_chain,
    validate_submit,
)

__all__ = [
    "CYCLE_SHOWN",
    "MAX_ATTEMPTS",
    "MAX_DURATION_S",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_MULTIPLIER",
    "MAX_NAME",
    "MAX_PATH_BYTES",
    "MAX_RETRY_LIST",
    "describe_cycle",
    "find_cycle",
    "labels_violations",
    "longest_chain",
    "validate_submit",
]
