"""deploy/ hands the daemons only flags and ``PLAIT_*`` variables they know.

Every command line under deploy/ (systemd ``Exec*=``, the Containerfile's ENTRYPOINT and CMD,
shell blocks and inline commands in the Markdown, Kubernetes containers' command/args) is held
to the parser of the program it runs — ``plait-coordinator``, ``plait-workerd`` or a ``plait``
subcommand — and every ``PLAIT_*`` variable it sets (``*.env`` files, ``Environment=``,
``ENV``, Kubernetes ``env:`` and ``envFrom`` ConfigMaps) to the ones that program reads. A flag
renamed in a daemon, or a variable only another program reads (``PLAIT_TLS_CERT`` is a
client's; the coordinator's own is ``PLAIT_SERVER_TLS_CERT``), fails here before an operator
finds it. The readers (tests/deploy_files.py) find files by kind, not by name, so new
manifests are checked as soon as they exist; the checks are in tests/deploy_flags.py. Also
here: TOML keys under deploy/ (``plait.toml``, ConfigMap entries) are coordinator settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.deploy_files import (
    CLI,
    COORDINATOR,
    WORKERD,
    EnvSetting,
    Invocation,
    deploy_env_settings,
    deploy_invocations,
    deploy_toml_keys,
    plait_mentions,
)
from tests.deploy_flags import (
    coordinator_setting_names,
    env_problems,
    env_vars,
    flag_problems,
    parser_for,
)

BIN = Path(sys.executable).parent


def _all_flag_problems(invocations: list[Invocation]) -> list[str]:
    return [p for inv in invocations for p in flag_problems(inv)]


def test_deploy_runs_both_daemons_from_every_kind_of_file() -> None:
    # Not vacuous: the readers find the units, the image and the README's commands.
    found = {(inv.where.split(" ")[0].split(":")[0], inv.program) for inv in deploy_invocations()}
    for expected in [
        ("deploy/systemd/plait-coordinator.service", COORDINATOR),
        ("deploy/systemd/plait-workerd.service", WORKERD),
        ("deploy/container/Containerfile", COORDINATOR),
        ("deploy/README.md", CLI),
    ]:
        assert expected in found, (expected, sorted(found))


def test_every_flag_in_deploy_is_one_its_program_takes() -> None:
    problems = _all_flag_problems(deploy_invocations())
    assert not problems, "\n".join(problems)


def test_every_plait_variable_deploy_sets_is_read_by_its_program() -> None:
    settings = deploy_env_settings()
    assert {s.name for s in settings} >= {"PLAIT_COORDINATOR", "PLAIT_LISTEN"}, settings
    problems = env_problems(settings)
    assert not problems, "\n".join(problems)


def test_every_plait_name_written_in_deploy_exists() -> None:
    # Prose and comments too: a misspelt or retired variable in the docs is drift as well.
    problems = env_problems(plait_mentions())
    assert not problems, "\n".join(problems)


def test_toml_keys_in_deploy_are_coordinator_settings() -> None:
    keys = deploy_toml_keys()
    assert keys, "no TOML under deploy/"
    unknown = [
        f"{where}: {key}"
        for where, key in keys
        if key.replace("-", "_") not in coordinator_setting_names()
    ]
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize(
    ("program", "script"), [(COORDINATOR, "plait-coordinator"), (WORKERD, "plait-workerd")]
)
def test_the_parsers_checked_are_the_ones_the_daemons_run(
    program: str, script: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--help`` of the installed entry point, and of ``plait coordinator|workerd`` which
    hands over to it, is exactly the parser the checker holds deploy/ to."""
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal: the same for all
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    outputs = [
        subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True, env=env).stdout
        for argv in ([str(BIN / script), "--help"], [str(BIN / "plait"), program, "--help"])
    ]
    assert outputs == [parser_for(program).format_help()] * 2


def test_a_flag_of_the_other_daemon_is_refused() -> None:
    assert flag_problems(Invocation("x", WORKERD, ("--listen", "0.0.0.0:7450")))
    assert flag_problems(Invocation("x", COORDINATOR, ("--coordinator", "a:1")))
    assert not flag_problems(Invocation("x", COORDINATOR, ("--listen=0.0.0.0:7450",)))
    # argparse would take an abbreviation; deploy files must spell flags out.
    assert flag_problems(Invocation("x", COORDINATOR, ("--metrics-l", "0.0.0.0:9450")))
    assert flag_problems(Invocation("x", COORDINATOR, ("--log-format", "xml")))
    assert not flag_problems(Invocation("x", WORKERD, ("--log-format", "$(FORMAT)")))
    assert flag_problems(Invocation("x", CLI, ("certs", "worker", "--nope")))
    assert not flag_problems(Invocation("x", CLI, ("certs", "worker", "--days", "30")))


def test_a_variable_another_program_reads_is_refused() -> None:
    # PLAIT_TLS_CERT names a client's certificate; the coordinator's is PLAIT_SERVER_TLS_CERT.
    assert "PLAIT_TLS_CERT" not in env_vars(COORDINATOR)
    assert "PLAIT_SERVER_TLS_CERT" in env_vars(COORDINATOR)
    assert "PLAIT_MAX_JSON_DEPTH" in env_vars(COORDINATOR)  # input limits are settings too
    assert "PLAIT_LISTEN" not in env_vars(WORKERD)
    assert {"PLAIT_COORDINATOR", "PLAIT_TLS_CA", "PLAIT_TOKEN"} <= env_vars(WORKERD)
    assert "PLAIT_OUTPUT" in env_vars(None)  # given to actions: a name that exists
    assert env_problems([EnvSetting("x", COORDINATOR, "PLAIT_TLS_CERT")])


PLANTED = {
    "systemd/plait-workerd.service": """\
        [Service]
        Environment=PLAIT_WORKER_ID=w1 "PLAIT_NO_SUCH_VAR=a b"
        ExecStart=/opt/plait/bin/plait workerd --id %H \\
            --made-up-unit-flag 1
        """,
    "container/Containerfile": """\
        ARG BASE=python:3.11-slim-bookworm
        FROM ${BASE} AS builder
        RUN plait-workerd --made-up-run-flag
        FROM ${BASE}
        ENV PLAIT_MADE_UP_IMAGE_VAR=1
        ENTRYPOINT ["/opt/plait/bin/plait"]
        CMD ["coordinator", "--made-up-cmd-flag"]
        """,
    "README.md": """\
        Run `plait certs worker --made-up-inline-flag 3` first.

        ```sh
        plait-coordinator --listen 127.0.0.1:7450 \\
            --made-up-readme-flag && echo ok
        runuser -u plait -- /opt/plait/bin/plait tokens create --made-up-runuser-flag
        systemctl restart plait-coordinator --made-up-but-not-ours
        podman run --rm -v ./pki:/etc/plait:ro --name plait-w plait:dev \\
            workerd --made-up-podman-flag
        ```
        """,
    "coordinator.env": """\
        PLAIT_LISTEN=0.0.0.0:7450
        #PLAIT_TLS_CERT=/etc/plait/tls/coordinator.crt
        """,
    "plait.toml": """\
        [coordinator]
        listen = "127.0.0.1:7450"
        # made_up_key = 1
        """,
    "kubernetes/plait.yaml": """\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: plait-env}
        data: {PLAIT_MADE_UP_MAP_VAR: "1", "plait.toml": "made_up_map_key = 2"}
        ---
        apiVersion: apps/v1
        kind: StatefulSet
        metadata: {name: plait-coordinator}
        spec:
          template:
            spec:
              initContainers:
                - name: init
                  image: plait:dev
                  args: [coordinator, --made-up-init-flag]
              containers:
                - name: coordinator
                  image: registry.example/plait:1
                  args: [coordinator, --listen, "0.0.0.0:7450", --made-up-k8s-flag]
                  env: [{name: PLAIT_TOKEN, value: x}]
                  envFrom: [{configMapRef: {name: plait-env}}]
                - name: worker
                  image: other
                  command: [sh, -c, "exec plait workerd --made-up-sh-flag"]
                - name: sidecar
                  image: prom/prometheus
                  args: [--config.file=/etc/prometheus.yml]
        ---
        apiVersion: apps/v1
        kind: StatefulSet
        metadata: {name: plait-coordinator}
        spec:
          template:
            spec:
              containers:
                - name: coordinator
                  env: [{name: PLAIT_STORE, value: "sqlite:///x"}, {name: PLAIT_WORKER_ID}]
        """,
}


def test_the_checker_catches_what_was_planted_in_every_kind_of_file(tmp_path: Path) -> None:
    for name, text in PLANTED.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    problems = "\n".join(_all_flag_problems(deploy_invocations(tmp_path)))
    for flag in re.findall(r"--made-up-[a-z-]+-flag", "".join(PLANTED.values())):
        assert flag in problems, f"{flag} not caught:\n{problems}"
    assert "--made-up-but-not-ours" not in problems  # systemctl's argument, not Plait's
    assert "--config.file" not in problems  # another image's container
    assert "`plait tokens create` has no flag --made-up-runuser-flag" in problems

    env = "\n".join(env_problems(deploy_env_settings(tmp_path)))
    for var in ("PLAIT_NO_SUCH_VAR", "PLAIT_MADE_UP_IMAGE_VAR", "PLAIT_MADE_UP_MAP_VAR"):
        assert var in env, f"{var} not caught:\n{env}"
    assert "PLAIT_TLS_CERT is not read by coordinator" in env
    assert "PLAIT_TOKEN is not read by coordinator" in env  # a worker's, set on the coordinator
    assert "PLAIT_WORKER_ID is not read by coordinator" in env  # in an overlay's patch
    assert "PLAIT_STORE" not in env and "PLAIT_LISTEN" not in env, env
    assert "Environment=: PLAIT_WORKER_ID" not in env, env

    keys = [k for _, k in deploy_toml_keys(tmp_path) if k not in coordinator_setting_names()]
    assert sorted(keys) == ["made_up_key", "made_up_map_key"]
