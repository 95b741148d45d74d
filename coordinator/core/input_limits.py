"""What clients and workers may send, as numbers (pure core).

:class:`Limits` is defined in the foundation (:mod:`plait.limits`), because the client checks a
workflow against the same numbers before it submits (``plait validate``); this module is the
core's name for it. The edge's configuration (``coordinator/config.py``) loads it from flags,
``PLAIT_*`` variables and TOML and re-exports it.
"""

from __future__ import annotations

from plait.limits import LEASE_HEADROOM_BYTES, MAX_MESSAGE_BYTES, Limits

__all__ = ["LEASE_HEADROOM_BYTES", "MAX_MESSAGE_BYTES", "Limits"]
