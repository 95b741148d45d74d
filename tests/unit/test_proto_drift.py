"""The committed stubs under clients/python/plait/v1 are exactly what proto/ generates.

Regenerates with the same ``grpc_tools.protoc`` invocation, include paths and mypy-protobuf
plugins as ``make proto`` into a temp dir and compares bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import google.rpc
import grpc_tools

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
COMMITTED = ROOT / "clients" / "python" / "plait" / "v1"
HAND_WRITTEN = {"__init__.py"}


def _generate(out: Path) -> None:
    google_protos = Path(google.rpc.__path__[0]).parent.parent
    grpc_protos = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT)) for p in (PROTO_DIR / "plait" / "v1").glob("*.proto"))
    env = dict(os.environ)
    # protoc finds protoc-gen-mypy and protoc-gen-mypy_grpc on PATH, next to this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"-I{google_protos}",
        f"-I{grpc_protos}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"protoc failed:\n{done.stderr}"


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    _generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "plait" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in COMMITTED.iterdir()
        if p.is_file() and p.name not in HAND_WRITTEN and p.suffix in (".py", ".pyi")
    }

    assert fresh, "protoc generated nothing"
    missing = sorted(fresh.keys() - committed.keys())
    stale = sorted(committed.keys() - fresh.keys())
    differ = sorted(n for n in fresh.keys() & committed.keys() if fresh[n] != committed[n])
    assert not (missing or stale or differ), (
        "generated stubs drifted from proto/ — run `make proto` and commit the result"
        f" (missing: {missing}, stale: {stale}, differ: {differ})"
    )
