"""Daemons that cannot start say why in one line (the address in use, the file they cannot
use) and exit non-zero without a traceback; `plait run` stopped by SIGTERM or SIGHUP takes its
workerd processes and its coordinator down, as Ctrl-C does. Real processes throughout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.system.harness import ROOT, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

PLAIT = [sys.executable, "-m", "plait.cli.main"]


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback address something is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def refused(*argv: str) -> str:
    """Runs a command that must refuse to start; returns its one line of stderr."""
    done = subprocess.run(
        [*PLAIT, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode not in (0, None), done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def coordinator(tmp_path: Path, *flags: str) -> list[str]:
    return [
        "coordinator",
        "--store",
        f"sqlite:///{tmp_path}/plait.db",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        *flags,
    ]


def test_coordinator_port_in_use_names_the_address(tmp_path: Path, taken: str) -> None:
    line = refused(*coordinator(tmp_path, "--listen", taken))
    assert f"--listen {taken}" in line and "address already in use" in line, line


def test_coordinator_metrics_port_in_use_names_the_address(tmp_path: Path, taken: str) -> None:
    line = refused(*coordinator(tmp_path, "--metrics-listen", taken))
    assert f"--metrics-listen {taken}" in line and "in use" in line, line


def test_coordinator_unusable_store_and_tls_files(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = refused(*coordinator(tmp_path), "--store", f"sqlite:///{blocker}/plait.db")
    assert str(blocker) in line, line
    missing = tmp_path / "missing.crt"
    line = refused(*coordinator(tmp_path, "--tls-cert", str(missing), "--tls-key", str(missing)))
    assert str(missing) in line, line


def test_workerd_metrics_port_in_use_and_missing_ca(tmp_path: Path, taken: str) -> None:
    base = ["workerd", "--coordinator", "127.0.0.1:1", "--allow-root"]
    base += ["--tmp-root", str(tmp_path / "attempts")]
    line = refused(*base, "--metrics-listen", taken)
    assert taken in line, line
    missing = tmp_path / "ca.crt"
    line = refused(*base, "--tls-ca", str(missing))
    assert str(missing) in line, line


def test_plait_run_with_an_unusable_store_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flow = tmp_path / "one.yaml"
    flow.write_text("name: one\nactions: [{id: a, run: [true]}]\n")
    line = refused("run", str(flow), "--store", f"sqlite:///{blocker}/sub/plait.db")
    assert str(blocker) in line and "--store" in line, line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_plait_run_takes_its_cluster_down_on(sig: signal.Signals, tmp_path: Path) -> None:
    flow = tmp_path / "nap.yaml"
    flow.write_text("name: nap\nactions: [{id: nap, run: [sleep, '60']}]\n")
    run = subprocess.Popen(
        [
            *PLAIT,
            "run",
            str(flow),
            "--workers",
            "2",
            "--store",
            f"sqlite:///{tmp_path}/p.db",
            "--ui",  # and its web UI, which shows the run while it lasts
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # like a shell's background job: our signals are not its
    )
    try:
        assert run.stdout is not None
        deadline = time.monotonic() + 60
        for line in run.stdout:  # plain progress lines: stdout is not a terminal
            if "nap started on" in line:
                break
            assert time.monotonic() < deadline, "the action did not start"
        else:
            pytest.fail(f"plait run ended early: {run.wait()} {run.stderr and run.stderr.read()}")

        def family_with_the_action() -> list[procs.Proc] | None:
            family = [p for p in procs.descendants(run.pid) if p.alive]
            return family if any("sleep 60" in p.cmdline() for p in family) else None

        assert run.stderr is not None
        ui = run.stderr.readline().strip()  # printed before the workflow is submitted
        assert ui.startswith("web UI: http://127.0.0.1:"), ui
        with urllib.request.urlopen(ui.removeprefix("web UI: ") + "api/workflows", timeout=10) as r:
            assert [w["name"] for w in json.load(r)["workflows"]] == ["nap"]

        family = wait_for("the action's process", family_with_the_action, 30)
        workerds = [p for p in family if "-m plait.workerd " in p.cmdline()]
        assert len(workerds) == 2, [p.describe() for p in family]

        run.send_signal(sig)
        assert run.wait(30) == 128 + sig
        err = run.stderr.read() if run.stderr else ""
        assert f"{sig.name} received: cancelling the workflow" in err, err
        assert "Traceback" not in err, err
        assert "state     cancelled" in run.stdout.read()
        # Its workerds, their helpers and the action: all gone with it (none re-parented).
        deadline = time.monotonic() + 5
        while (alive := [p for p in family if procs.is_alive(p.pid)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not alive, [p.describe() for p in alive]
    finally:
        if run.poll() is None:  # the test failed before the signal: stop it the usual way
            run.send_signal(signal.SIGINT)
            try:
                run.wait(30)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
