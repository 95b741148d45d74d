"""deploy/systemd: the units are valid systemd units and agree with the daemons' flags.

``systemd-analyze verify`` loads a unit the way systemd would and reports unknown keys, bad
values, bad specifiers and missing executables. It needs no running systemd (works in a
container), but it checks that every ``Exec*=`` binary exists, and Plait is not installed in
``/opt/plait`` here. So each test builds a throwaway root: the distribution's own units (for
``sysinit.target`` and the rest of the default dependencies), our units in ``/etc/systemd/system``,
the users from ``deploy/sysusers.d`` (made by ``systemd-sysusers --root``), and an executable
stub at every absolute path the units' ``Exec*=`` lines name — and runs ``verify --root``
on it. The unit files themselves are copied unchanged. ``verify`` exits 0 even when it warns
about an unknown key or an unparsable value, so any output at all fails the test.

``systemd-analyze security --offline=yes`` scores the hardening (0 best, 10 worst); the tests
hold each unit to the exposure deploy/README.md documents.

Skipped where systemd-analyze is missing; under CI (``CI`` set) that is a failure instead:
``.ci/run`` installs systemd.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.coordinator import config as coordinator_config
from plait.workerd import config as workerd_config
from tests.deploy_files import read_unit

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
SYSUSERS = ROOT / "deploy" / "sysusers.d" / "plait.conf"
COORDINATOR = "plait-coordinator.service"
WORKERD = "plait-workerd.service"
# The exposure each unit is held to (deploy/README.md, "Hardening"): measured 1.3 and 2.6 with
# systemd 252; the margin absorbs small re-weightings between systemd versions.
MAX_EXPOSURE = {COORDINATOR: 2.0, WORKERD: 3.5}
SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install -y systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run must install it")
        pytest.skip(message)
    return path


# ----- the units, read with tests/deploy_files.py's reader -------------------------------------


def service(name: str) -> dict[str, list[str]]:
    return read_unit(UNITS / name)["Service"]


def one(name: str, key: str) -> str:
    (value,) = service(name)[key]
    return value


def exec_paths(name: str) -> set[str]:
    """The absolute programs the unit's ``Exec*=`` lines run (prefixes ``@-:+!`` removed)."""
    out = set()
    for key, values in service(name).items():
        if key.startswith("Exec"):
            for value in values:
                program = shlex.split(value)[0].lstrip("@-:+!")
                assert program.startswith("/"), f"{name}: {key} {program!r} is not absolute"
                out.add(program)
    return out


def daemon_args(name: str, command: str) -> list[str]:
    """ExecStart's arguments after ``plait COMMAND``, with the specifiers we use filled in."""
    argv = shlex.split(one(name, "ExecStart"))
    assert argv[:2] == ["/opt/plait/bin/plait", command], argv
    subst = {"%d": "/run/credentials/" + name, "%H": "host1.example.com"}
    return [re.sub(r"%[dH]", lambda m: subst[m.group(0)], a) for a in argv[2:]]


# ----- systemd-analyze ------------------------------------------------------------------------


@pytest.fixture
def fake_root(tmp_path: Path) -> Iterator[Path]:
    """A root holding the system's units, ours, our users and stubs for every Exec binary."""
    _require_tool("systemd-analyze")
    system_units = next(
        (Path(d) for d in SYSTEM_UNIT_DIRS if (Path(d) / "sysinit.target").exists()), None
    )
    if system_units is None:
        message = f"no sysinit.target in {' or '.join(SYSTEM_UNIT_DIRS)}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: .ci/run must install systemd")
        pytest.skip(message)
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    ours = root / "etc/systemd/system"
    ours.mkdir(parents=True)
    for unit in (COORDINATOR, WORKERD):
        shutil.copy(UNITS / unit, ours / unit)
        for program in exec_paths(unit):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    (root / "etc").mkdir(exist_ok=True)
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is not None:
        done = subprocess.run(
            [sysusers, f"--root={root}", str(SYSUSERS)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"systemd-sysusers: {done.stderr}"
    yield root


def analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
    )


def test_units_pass_systemd_analyze_verify(fake_root: Path) -> None:
    done = analyze("verify", f"--root={fake_root}", "--man=no", COORDINATOR, WORKERD)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not output, f"exit {done.returncode}:\n{output}"


def test_verify_catches_a_broken_unit(fake_root: Path) -> None:
    # The harness must be able to fail: a bad key, a bad value and a missing program.
    unit = fake_root / "etc/systemd/system" / WORKERD
    unit.write_text(
        unit.read_text()
        .replace("KillMode=mixed", "KillMode=bogus\nNoSuchKey=1")
        .replace("/opt/plait/bin/plait", "/opt/plait/bin/nothing-here")
    )
    done = analyze("verify", f"--root={fake_root}", "--man=no", WORKERD)
    output = done.stdout + done.stderr
    assert "bogus" in output and "NoSuchKey" in output, output
    assert done.returncode != 0 and "nothing-here" in output, output


def test_sysusers_declares_the_units_users(fake_root: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    passwd = (fake_root / "etc/passwd").read_text()
    users = {line.split(":")[0]: line.split(":") for line in passwd.splitlines()}
    for unit in (COORDINATOR, WORKERD):
        user = one(unit, "User")
        assert user in users, f"{unit}: User={user} is not in deploy/sysusers.d/plait.conf"
        assert one(unit, "Group") == user
        assert users[user][-1].endswith("nologin"), users[user]


@pytest.mark.parametrize("unit", [COORDINATOR, WORKERD])
def test_security_exposure(fake_root: Path, unit: str) -> None:
    done = analyze("security", "--offline=yes", f"--root={fake_root}", "--no-pager", unit)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert found, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE[unit], (
        f"{unit}: exposure {exposure} > {MAX_EXPOSURE[unit]}\n{done.stdout}"
    )


# ----- the units against the daemons (no systemd needed) ------------------------------------


def test_coordinator_unit_flags_are_the_coordinators() -> None:
    args = coordinator_config.build_parser().parse_args(daemon_args(COORDINATOR, "coordinator"))
    assert args.config == "/etc/plait/plait.toml"
    creds = f"/run/credentials/{COORDINATOR}"
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        f"{creds}/coordinator.crt",
        f"{creds}/coordinator.key",
        f"{creds}/ca.crt",
    )


def test_workerd_unit_flags_are_workerds() -> None:
    args = workerd_config.build_parser({}).parse_args(daemon_args(WORKERD, "workerd"))
    assert args.worker_id == "host1.example.com"
    creds = f"/run/credentials/{WORKERD}"
    assert (args.tls_ca, args.tls_cert, args.tls_key) == (
        f"{creds}/ca.crt",
        f"{creds}/worker.crt",
        f"{creds}/worker.key",
    )


@pytest.mark.parametrize("unit", [COORDINATOR, WORKERD])
def test_every_credential_used_is_loaded(unit: str) -> None:
    loaded = {value.partition(":")[0] for value in service(unit)["LoadCredential"]}
    used = set(re.findall(r"%d/([A-Za-z0-9_.-]+)", one(unit, "ExecStart")))
    assert used and used == loaded, (used, loaded)
    for value in service(unit)["LoadCredential"]:
        assert value.partition(":")[2].startswith("/etc/plait/tls/"), value


def test_hardening_essentials() -> None:
    for unit in (COORDINATOR, WORKERD):
        s = service(unit)
        assert one(unit, "NoNewPrivileges") == "yes"
        assert one(unit, "CapabilityBoundingSet") == ""
        assert one(unit, "Restart") == "on-failure"
        assert one(unit, "RestartPreventExitStatus") == "2"
        assert "@system-service" in s["SystemCallFilter"]
        assert s["User"] != ["root"]
    assert one(COORDINATOR, "ProtectSystem") == "strict"
    assert "/var/lib/plait" in one(COORDINATOR, "ReadWritePaths").split()
    # SIGTERM to workerd alone (it drains); then SIGKILL to the whole cgroup, actions included.
    assert one(WORKERD, "KillMode") == "mixed"
    assert one(COORDINATOR, "User") != one(WORKERD, "User")
