"""Facts about an action spec that both sides of the wire ask (SDK layer: plait.spec).

The client's validation (``plait validate``) and the coordinator's core (validation, dispatch,
fork/join, "why is it waiting") read a spec's shape through these functions, so each default is
written once.
"""

from __future__ import annotations

from plait.v1 import workflow_pb2 as pb

__all__ = ["fans_out", "semaphore_terms"]


def fans_out(spec: pb.ActionSpec) -> bool:
    """Whether an action fans out (a ``map`` or a ``pipeline``): it runs as the children it
    becomes, never on a worker itself. The one test of that, wherever it is asked."""
    return spec.HasField("map") or spec.HasField("pipeline")


def semaphore_terms(req: pb.SemaphoreRequest) -> tuple[int, int]:
    """``(capacity, permits)`` a request declares, each 1 when unset (0): the proto's default.

    The one place that default is written; validation, dispatch and "why is it waiting" use it.
    """
    return req.capacity or 1, req.permits or 1
