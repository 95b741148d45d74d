"""The TypeScript worker SDK's own tests pass: ``npm test`` in clients/typescript.

``npm test`` compiles (tsc, strict) and runs node's test runner over dist/test: unit tests of
the fence arithmetic, backoff, HLC, credits and result acks against a scripted coordinator, and
one end-to-end run on a real ``plait coordinator``. Skips without node or node_modules on a
developer's machine; fails under CI (``CI`` set), where .ci/run installs both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_typescript_stubs import TS, require_node_modules


@pytest.mark.timeout(600)
def test_typescript_sdk_tests_pass() -> None:
    require_node_modules()
    env = {**os.environ, "PLAIT_BIN": str(Path(sys.executable).parent / "plait")}
    done = subprocess.run(
        ["npm", "test"],
        cwd=TS,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"npm test failed (exit {done.returncode}):\n{output[-8000:]}"
    assert "# fail 0" in output, output[-4000:]
