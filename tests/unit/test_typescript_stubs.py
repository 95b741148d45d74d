"""The committed TypeScript stubs under clients/typescript/src/gen are what proto/ generates.

Runs ``clients/typescript/scripts/generate.sh`` (the script behind ``npm run generate`` and
``make proto-ts``: ts-proto, pinned in package.json, as a plugin of the venv's protoc) into a temp
dir and compares every file. Skips without node or node_modules on a developer's machine; fails
under CI (``CI`` set), where .ci/run installs both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import required_tool

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "typescript"
COMMITTED = TS / "src" / "gen"


def require_node_modules() -> None:
    """Skips (fails under CI) unless node and clients/typescript/node_modules are installed."""
    required_tool("npm")
    if (TS / "node_modules" / ".bin" / "protoc-gen-ts_proto").exists():
        return
    message = f"{TS.relative_to(ROOT)}/node_modules is missing (make ts, or npm ci there)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run must install it")
    pytest.skip(message)


def _files(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def test_committed_typescript_stubs_match_proto(tmp_path: Path) -> None:
    require_node_modules()
    env = {**os.environ, "PLAIT_PYTHON": sys.executable}
    done = subprocess.run(
        ["sh", str(TS / "scripts" / "generate.sh"), str(tmp_path)],
        cwd=TS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"generate.sh failed:\n{done.stdout}\n{done.stderr}"
    fresh, committed = _files(tmp_path), _files(COMMITTED)

    assert any(name.endswith("worker_service.ts") for name in fresh), "protoc generated nothing"
    missing = sorted(fresh.keys() - committed.keys())
    stale = sorted(committed.keys() - fresh.keys())
    differ = sorted(n for n in fresh.keys() & committed.keys() if fresh[n] != committed[n])
    assert not (missing or stale or differ), (
        "TypeScript stubs drifted from proto/ — run `make proto-ts` and commit the result"
        f" (missing: {missing}, stale: {stale}, differ: {differ})"
    )
