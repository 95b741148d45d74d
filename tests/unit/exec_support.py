"""Test support (unit tier) for the exec executor tests: a fake attempt context, exec leases,
and waiting on real processes and files."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from plait.v1 import worker_service_pb2 as pb
from plait.v1 import workflow_pb2
from plait.worker.executor import AttemptResult
from plait.workerd.exec_executor import ExecExecutor

PY = sys.executable


class FakeCtx:
    """Collects the one result an attempt reports."""

    def __init__(self, lease_id: str, kill_grace: float = 0.25) -> None:
        self.lease_id = lease_id
        self.kill_grace = kill_grace
        self.results: list[AttemptResult] = []
        self.reported = asyncio.Event()

    def report(self, result: AttemptResult) -> None:
        self.results.append(result)
        self.reported.set()


def exec_lease(
    argv: list[str],
    *,
    shell: bool = False,
    env: dict[str, str] | None = None,
    static_input: Any = None,
    inputs_json: str | None = None,
    timeout: float | None = None,
    lease_id: str = "lease-1",
) -> pb.Lease:
    spec = workflow_pb2.ActionSpec(id="act", exec=workflow_pb2.ExecAction(argv=argv, shell=shell))
    if env:
        spec.env.update(env)
    if static_input is not None:
        spec.input_json = json.dumps(static_input)
    if timeout is not None:
        spec.timeout.FromNanoseconds(int(timeout * 1e9))
    if inputs_json is None:
        inputs_json = json.dumps({"input": static_input, "needs": {}})
    return pb.Lease(
        lease_id=lease_id,
        workflow_id="wf-1",
        action_id="act",
        attempt=2,
        fencing_token=42,
        action=spec,
        inputs_json=inputs_json,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        idempotency_key="wf-1/act",
    )


async def run_lease(
    ex: ExecExecutor, lease: pb.Lease, kill_grace: float = 0.25, limit: float = 20.0
) -> AttemptResult:
    ctx = FakeCtx(lease.lease_id, kill_grace)
    ex.start(lease, ctx)
    await asyncio.wait_for(ctx.reported.wait(), limit)
    assert len(ctx.results) == 1
    return ctx.results[0]


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_dead(pid: int, limit: float = 5.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def wait_file(path: Path, limit: float = 10.0) -> str:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")
