"""deploy/container/Containerfile: its shape, read without building it (no image builds here).

What CI cannot build it holds to by reading: two stages on the locks' Python; the builder's only
install step is deploy/container/install.sh — the script tests/system/test_container_install.py
runs for real — with a lock that exists and is copied in; the runtime stage takes only the venv
and runs as a numeric non-root user; the ports it exposes are the coordinator's defaults; and
the build context (.dockerignore) lets through every file the COPY lines take. Its ENTRYPOINT
and CMD flags are checked with the rest of deploy/ in test_deploy_flags.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest

from plait.coordinator import config as coordinator_config
from tests.deploy_files import (
    CONTAINERFILE,
    INSTALL_SH,
    ROOT,
    Stage,
    image_command,
    install_runs,
    read_containerfile,
)

IGNORE_FILE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_containerfile(CONTAINERFILE)


def copy_sources(stage: Stage) -> list[str]:
    """The build-context paths a stage's COPY/ADD lines take (not ``--from`` another stage)."""
    out = []
    for copy in stage.all("COPY") + stage.all("ADD"):
        flags, words = copy.flags_and_words()
        if "from" not in flags:
            out += words[:-1]
    return out


def test_two_stages_on_the_python_the_locks_are_for(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[0].name, "the builder stage is named (COPY --from uses the name)"
    header = (ROOT / "requirements" / "otlp.lock").read_text().splitlines()[1]
    version = re.search(r"--python-version ([0-9.]+)", header)
    assert version, header
    # One base for all stages: the venv's bin/python links to the base's interpreter.
    assert {s.base for s in stages} == {stages[0].base}, [s.base for s in stages]
    assert re.fullmatch(
        rf"python:{re.escape(version.group(1))}-slim-\w+(@sha256:\w+)?", stages[0].base
    )


def test_the_only_install_step_is_install_sh(stages: list[Stage]) -> None:
    runs = install_runs(stages)
    assert len(runs) == 1, runs
    stage, _, args = runs[0]
    assert stage is stages[0] and len(args) == 2, (stage.name, args)
    prefix, lock = args
    assert prefix == "/opt/plait"
    assert (ROOT / lock).is_file() and lock.startswith("requirements/") and lock.endswith(".lock")
    sources = copy_sources(stage)
    assert lock in sources or any(lock.startswith(s.rstrip("/") + "/") for s in sources), sources
    assert INSTALL_SH in sources
    assert os.access(ROOT / INSTALL_SH, os.X_OK), f"{INSTALL_SH} is not executable"
    # No other RUN installs anything: what CI proves is all the image installs.
    for s in stages:
        for run in s.all("RUN"):
            assert not re.search(r"\bpip\b|\bapt(-get)?\b|\bcurl\b|\bwget\b", run.value), run


def test_install_sh_is_valid_sh_and_installs_by_hash_only() -> None:
    script = (ROOT / INSTALL_SH).read_text()
    assert script.startswith("#!/bin/sh\n") and "\nset -eu\n" in script
    if shutil.which("sh"):
        done = subprocess.run(
            ["sh", "-n", str(ROOT / INSTALL_SH)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    installs = [line for line in script.splitlines() if re.search(r"\$pip (install|wheel)", line)]
    assert len(installs) == 3, installs
    assert "--require-hashes" in installs[0] and "--only-binary :all:" in installs[0]
    assert all("--no-deps" in line for line in installs[1:]), installs
    assert "--no-build-isolation" in installs[1] and "--no-index" in installs[2], installs
    assert "$pip check" in script


def test_every_package_folder_reaches_the_build(stages: list[Stage]) -> None:
    # setuptools maps folders onto the plait package (pyproject.toml); a new one must be copied
    # by the Containerfile and by install.sh, or the wheel misses it.
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = re.findall(r'"\$src/([^"$]+)"', (ROOT / INSTALL_SH).read_text())  # its cp lines
    sources = [s.rstrip("/") for s in copy_sources(stages[0])]
    assert copied, "install.sh copies the sources it builds from"
    for folder in sorted(folders):
        for taken, by in ((sources, "the Containerfile"), (copied, INSTALL_SH)):
            assert any(folder == t or folder.startswith(t + "/") for t in taken), (folder, by)


def test_the_runtime_stage_takes_only_the_venv_and_runs_as_10001(stages: list[Stage]) -> None:
    final = stages[-1]
    assert copy_sources(final) == [], "the runtime stage takes nothing from the build context"
    copies = [c.flags_and_words() for c in final.all("COPY")]
    assert copies == [({"from": stages[0].name}, ["/opt/plait", "/opt/plait"])], copies
    users = final.all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].value.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1].value}: numeric and not root"
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1].value
    # ... and it is a user the image knows (a name for logs and ps), with no login shell.
    setup = " ".join(r.value for r in final.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {uid}\b.*--shell /usr/sbin/nologin", setup), setup
    if gid:
        assert re.search(rf"groupadd\b.*--gid {gid}\b", setup), setup
    assert users[-1].line > max(r.line for r in final.all("RUN")), "USER after the last RUN"


def test_it_runs_the_venvs_plait_with_no_shell(stages: list[Stage]) -> None:
    entrypoint, cmd = image_command(stages)  # asserts exec form (no /bin/sh -c)
    assert entrypoint == ["/opt/plait/bin/plait"]
    assert "plait" in PYPROJECT["project"]["scripts"]
    assert cmd[:1] == ["coordinator"], cmd
    assert not stages[-1].all("HEALTHCHECK"), "Kubernetes ignores HEALTHCHECK; probe gRPC health"


def test_exposed_ports_are_the_coordinators_defaults(stages: list[Stage]) -> None:
    exposed = {
        int(port.split("/")[0]) for e in stages[-1].all("EXPOSE") for port in e.value.split()
    }
    defaults = {
        coordinator_config.split_host_port(coordinator_config.DEFAULT_LISTEN)[1],
        coordinator_config.split_host_port(coordinator_config.DEFAULT_METRICS_LISTEN)[1],
    }
    assert exposed == defaults


# ----- the build context ----------------------------------------------------------------------


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over a whole path."""
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out += ".*"
            i += 2
            if glob.startswith("/", i):
                out += "/?"
                i += 1
            continue
        c = glob[i]
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out)


def context_includes(path: str, rules: list[str]) -> bool:
    """Whether the build context holds ``path``: the last rule matching it or a folder above it
    decides (``!`` lets it through), as docker and podman read .dockerignore."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        regex = _pattern(rule.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def test_the_context_holds_what_copy_takes_and_little_else(stages: list[Stage]) -> None:
    rules = [
        line.strip()
        for line in IGNORE_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages:
        for source in copy_sources(stage):
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert context_includes(source, rules), f"COPY {source}: .dockerignore excludes it"
    for kept_out in [
        ".venv",
        ".git",
        "clients/typescript",
        "deploy/systemd",
        "pki/ca.key",
        "coordinator/__pycache__",
        "plait.db",
    ]:
        assert not context_includes(kept_out, rules), f"{kept_out} would enter the context"
    # The matcher itself: a rule that excludes is seen to exclude.
    assert not context_includes("workerd/x.py", [*rules, "workerd"])


def test_readme_build_command_names_the_containerfile() -> None:
    readme = (ROOT / "deploy" / "container" / "README.md").read_text()
    lines = re.findall(r"(?:podman|docker) build [^\n`]+", readme)
    commands = [shlex.split(line, comments=True) for line in lines]
    assert commands, "deploy/container/README.md shows the build command"
    for words in commands:
        assert "-f" in words and words[words.index("-f") + 1] == str(
            CONTAINERFILE.relative_to(ROOT)
        )
        assert words[-1] == "."
