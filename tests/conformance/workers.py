"""The worker implementations the conformance suite drives, and how to start one (tests layer).

An implementation is a command template: argv words with ``{coordinator}`` (HOST:PORT),
``{id}`` (the worker id), ``{slots}``, ``{python}`` (this interpreter) and ``{root}`` (the
repository) filled in. ``PLAIT_CONFORMANCE_WORKER`` (a shell-quoted command line with the same
placeholders) replaces the known implementations with that one command, named ``custom``.
Tests that advertise labels append ``--label KEY=VALUE`` per label.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from tests.system.harness import ROOT, Cluster, Daemon

ENV_COMMAND = "PLAIT_CONFORMANCE_WORKER"
HANDLERS = ("echo", "sleep", "fail", "progress")
TS_DIST = ROOT / "clients" / "typescript" / "dist"
TS_WORKER = TS_DIST / "examples" / "worker.js"


@dataclass(frozen=True)
class Implementation:
    """One worker implementation under test."""

    name: str
    template: tuple[str, ...]
    needs_node: bool = False

    def argv(self, *, coordinator: str, worker_id: str, slots: int) -> list[str]:
        values = {
            "coordinator": coordinator,
            "id": worker_id,
            "slots": str(slots),
            "python": sys.executable,
            "root": str(ROOT),
        }
        return [word.format(**values) for word in self.template]

    def require(self) -> None:
        """Skips (under CI: fails) when the implementation is not built on this machine."""
        problem = None
        if self.needs_node and shutil.which("node") is None:
            problem = "node is not installed (apt-get install -y nodejs npm)"
        elif self.needs_node and not TS_WORKER.is_file():
            problem = (
                f"{os.path.relpath(TS_WORKER, ROOT)} is missing: build the TypeScript worker first"
                " (cd clients/typescript && npm ci && npm run build)"
            )
        if problem is None:
            return
        if os.environ.get("CI"):
            pytest.fail(f"{self.name}: {problem}; .ci/run must build it")
        pytest.skip(f"{self.name}: {problem}")


KNOWN = (
    Implementation(
        "workerd",
        (
            "{python}",
            "-m",
            "plait.workerd",
            "--coordinator",
            "{coordinator}",
            "--id",
            "{id}",
            "--slots",
            "{slots}",
            "--handlers",
            "tests.conformance.handlers:worker",
            "--no-exec",
            # Adaptive concurrency may rightly hold slots back on a loaded host; the suite
            # checks that every offered slot is credited and used.
            "--no-adaptive",
            "--allow-root",
            "--reconnect-backoff",
            "50ms:1s",
        ),
    ),
    Implementation(
        "python-sdk",
        (
            "{python}",
            "-m",
            "tests.conformance.python_worker",
            "--coordinator",
            "{coordinator}",
            "--id",
            "{id}",
            "--slots",
            "{slots}",
        ),
    ),
    Implementation(
        "typescript",
        (
            "node",
            str(TS_WORKER),
            "--coordinator",
            "{coordinator}",
            "--id",
            "{id}",
            "--slots",
            "{slots}",
        ),
        needs_node=True,
    ),
)


def implementations() -> list[Implementation]:
    """The implementations to run the suite against: ``PLAIT_CONFORMANCE_WORKER`` alone when
    it is set, else every known one."""
    command = os.environ.get(ENV_COMMAND, "").strip()
    if command:
        return [Implementation("custom", tuple(shlex.split(command)))]
    return list(KNOWN)


def start_worker(
    cluster: Cluster,
    impl: Implementation,
    name: str,
    *,
    slots: int = 2,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    extra_args: Sequence[str] = (),
    coordinator: str | None = None,
) -> Daemon:
    """Starts one worker of ``impl`` against the cluster's coordinator (or ``coordinator``, a
    proxy in front of it), as a daemon the cluster stops (and checks for leftovers) on close; by
    default waits until ListWorkers shows it."""
    target = coordinator or cluster.grpc_target
    argv = impl.argv(coordinator=target, worker_id=name, slots=slots)
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    argv += list(extra_args)
    return cluster.start_daemon(name, argv, env, wait=wait)
