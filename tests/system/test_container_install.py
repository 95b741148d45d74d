"""The image's install steps, run for real: deploy/container/install.sh into a temporary venv.

No image can be built here, so CI proves the Containerfile's one install step instead: the
script runs with the very arguments its ``RUN`` passes (read from the Containerfile; the
prefix moved to a temporary directory and the interpreter the tests run on), and what it
installed is then held to what the image promises — the lock's pins and nothing else, every
module importable without dev tools, and daemons that serve: a coordinator from the venv on a
temporary SQLite journal, a workerd from it and a workflow submitted with its ``plait``.

Slow (a fresh venv from PyPI, reusing pip's cache: about 35 s here with the cache warm, 50 s
without it), so it is marked ``slow``; CI runs every tier.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.deploy_files import INSTALL_SH, ROOT, install_runs, read_containerfile
from tests.system.harness import START_TIMEOUT_S, TEST_PROFILE, Daemon, HarnessError, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(600)]

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEV_TOOLS = ("pytest", "mypy", "ruff", "hypothesis", "grpc_tools", "selenium", "uv")
_PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


@dataclass(frozen=True)
class Installed:
    prefix: Path
    lock: str
    seconds: float
    tmp: Path

    def bin(self, name: str) -> str:
        return str(self.prefix / "bin" / name)


def clean_env() -> dict[str, str]:
    """Ours, less anything that would let the venv see the repository or the test venv."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PLAIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """install.sh run as the Containerfile runs it, into a temporary prefix."""
    runs = install_runs(read_containerfile())
    assert len(runs) == 1, runs
    image_prefix, lock = runs[0][2]
    assert image_prefix == "/opt/plait"
    tmp = tmp_path_factory.mktemp("container")
    prefix = tmp / "opt-plait"
    # pip's own cache (~/.cache/pip) is left on: a second run downloads nothing.
    env = {**clean_env(), "PYTHON": sys.executable}
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / INSTALL_SH), str(prefix), lock],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, (
        f"install.sh exit {done.returncode}:\n{done.stdout[-8000:]}\n{done.stderr[-8000:]}"
    )
    print(f"install.sh {prefix} {lock}: {seconds:.1f}s")
    return Installed(prefix, lock, seconds, tmp)


def run(installed: Installed, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=installed.tmp,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_entry_points_run(installed: Installed) -> None:
    version = run(installed, installed.bin("plait"), "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"plait {VERSION}"), version
    helps = {}
    for argv in (
        ["plait-coordinator", "--help"],
        ["plait", "coordinator", "--help"],
        ["plait-workerd", "--help"],
        ["plait", "workerd", "--help"],
        ["plait", "--help"],
    ):
        done = run(installed, installed.bin(argv[0]), *argv[1:])
        assert done.returncode == 0 and not done.stderr, (argv, done)
        helps[" ".join(argv)] = done.stdout
    assert helps["plait-coordinator --help"] == helps["plait coordinator --help"]
    assert helps["plait-workerd --help"] == helps["plait workerd --help"]
    assert "--listen LISTEN" in helps["plait-coordinator --help"]
    assert "--coordinator HOST:PORT" in helps["plait-workerd --help"]
    assert helps["plait --help"].startswith("usage: plait")


def _lock_pins(lock: str) -> dict[str, str]:
    """``{name: version}`` of the lock's entries whose marker holds for this interpreter."""
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        m = _PIN.match(line)
        if m and (m.group(3) is None or Marker(m.group(3)).evaluate()):
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_the_venv_holds_the_lock_and_plait_and_nothing_else(installed: Installed) -> None:
    check = run(installed, installed.bin("python"), "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    listing = run(
        installed,
        installed.bin("python"),
        "-c",
        "import importlib.metadata as m, json;"
        " print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )
    assert listing.returncode == 0, listing.stderr
    found = {canonicalize_name(k): v for k, v in json.loads(listing.stdout).items()}
    assert found.pop("pip", None), "pip: the venv's own"
    assert found.pop("plait") == VERSION
    assert found == _lock_pins(installed.lock)


IMPORTS = """
import importlib, importlib.resources, importlib.util, json, pkgutil, sys
import plait
names = [m.name for m in pkgutil.walk_packages(plait.__path__, "plait.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # the otlp lock's exporters
static = importlib.resources.files("plait.coordinator.ui") / "static"
print(json.dumps({
    "file": plait.__file__,
    "modules": len(names),
    "static": sorted(p.name for p in static.iterdir()),
    "dev": [t for t in sys.argv[1:] if importlib.util.find_spec(t) is not None],
}))
"""


def test_every_module_imports_from_the_venv_and_no_dev_tool_does(installed: Installed) -> None:
    done = run(installed, installed.bin("python"), "-c", IMPORTS, *DEV_TOOLS)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert Path(result["file"]).is_relative_to(installed.prefix), result["file"]
    assert result["modules"] > 50 and result["static"], result
    assert result["dev"] == [], f"dev tools in the image's venv: {result['dev']}"
    assert not [t for t in DEV_TOOLS if (installed.prefix / "bin" / t).exists()]


@pytest.fixture
def daemons(installed: Installed) -> Iterator[dict[str, Daemon]]:
    started: dict[str, Daemon] = {}
    try:
        yield started
    finally:
        for daemon in reversed(started.values()):
            daemon.stop()


def _start(daemons: dict[str, Daemon], installed: Installed, name: str, argv: list[str]) -> Daemon:
    daemon = Daemon(name, argv, clean_env(), installed.tmp / f"{name}.log")
    daemons[name] = daemon
    daemon.start()
    return daemon


def _stop(daemon: Daemon) -> int | None:
    daemon.send(signal.SIGTERM)
    return daemon.wait(30)


def test_the_installed_daemons_run_a_workflow(
    installed: Installed, daemons: dict[str, Daemon]
) -> None:
    tmp = installed.tmp
    ready = tmp / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [installed.bin("plait-coordinator"), "--listen", "127.0.0.1:0"]
    argv += ["--metrics-listen", "127.0.0.1:0", "--ui-listen", "127.0.0.1:0"]
    argv += ["--store", f"sqlite:///{tmp}/plait.db", "--ready-file", str(ready)]
    for flag, value in TEST_PROFILE.items():
        argv += [flag, value]
    coordinator = _start(daemons, installed, "coordinator", argv)

    def leader() -> dict[str, str] | None:
        if not coordinator.running():
            raise HarnessError(f"the coordinator exited:\n{coordinator.log_tail()}")
        try:
            data = json.loads(ready.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("role") == "leader" else None

    endpoints = wait_for("the installed coordinator's ready file", leader, START_TIMEOUT_S)
    assert endpoints["pid"] == coordinator.pid

    with grpc.insecure_channel(endpoints["grpc"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://{endpoints['metrics']}/metrics", timeout=10) as r:
        assert "plait_" in r.read().decode()
    with urllib.request.urlopen(endpoints["ui"], timeout=10) as r:  # aiohttp, from the lock
        assert r.status == 200 and "html" in r.headers.get("Content-Type", "")

    worker = [installed.bin("plait-workerd"), "--coordinator", endpoints["grpc"]]
    worker += ["--id", "image-1", "--slots", "1", "--tmp-root", str(tmp / "attempts")]
    if os.geteuid() == 0:
        worker.append("--allow-root")  # CI runs as root; the image runs as 10001
    workerd = _start(daemons, installed, "workerd", worker)

    flow = tmp / "flow.yaml"
    flow.write_text(
        "name: image-smoke\nactions:\n  - id: hello\n    run: [sh, -c, 'echo from the image']\n"
    )
    plait = [installed.bin("plait"), "--coordinator", endpoints["grpc"]]
    done = run(installed, *plait, "submit", str(flow), "--wait", "-o", "json", timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{workerd.log_tail()}"
    result = json.loads(done.stdout)
    assert result["workflow"]["state"] == "WORKFLOW_STATE_SUCCEEDED", result
    workers = run(installed, *plait, "workers", "-o", "json")
    assert [w["worker_id"] for w in json.loads(workers.stdout)["workers"]] == ["image-1"]

    assert _stop(workerd) == 0, workerd.log_tail()
    assert _stop(coordinator) == 0, coordinator.log_tail()
