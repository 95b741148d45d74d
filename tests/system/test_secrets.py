"""Secrets on real processes: values reach the action's environment and nothing else.

A real coordinator and a real workerd started with ``--secret NAME=file:PATH`` and
``--secret NAME=env:VAR``; the actions print the values to stdout and stderr, fail with them in
their message and try to return them as outputs. The values must be absent from every byte of
the journal's directory (database, WAL, logs), from ``plait events -o json``, ``plait logs``
and ``plait status``, while the action did get them (a hash of them in its outputs). A rotated
file is read by the next attempt; a secret the worker does not provide fails the attempt,
naming it, without a retry. The journal's files are 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from plait.v1 import workflow_pb2 as wf
from tests.system.harness import Cluster, python_action, wait_for, workflow
from tests.system.patterns_support import plait_cli

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

FILE_MARK = f"file-secret-{uuid.uuid4().hex}"
ENV_MARK = f"env-secret-{uuid.uuid4().hex}"
ENV_VAR = "PLAIT_TEST_SECRET_VALUE"  # in workerd's environment only


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secret_action(action_id: str, code: str, **secrets: str) -> wf.ActionSpec:
    action = python_action(action_id, code)
    action.secrets.update(secrets)
    action.retry.max_attempts = 1
    return action


def start(cluster: Cluster, secret_file: Path) -> None:
    cluster.start_coordinator()
    cluster.add_worker(
        "w1",
        env={ENV_VAR: ENV_MARK},
        extra_args=[
            "--secret",
            f"file-tok=file:{secret_file}",
            "--secret",
            f"env-tok=env:{ENV_VAR}",
        ],
    )


def test_values_reach_the_action_and_nothing_else(
    cluster: Cluster, workerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    secret_file = tmp_path_factory.mktemp("secrets") / "token"  # outside the journal's dir
    secret_file.write_text(FILE_MARK + "\n")
    start(cluster, secret_file)
    both = 'os.environ["FROM_FILE"] + "|" + os.environ["FROM_ENV"]'
    spec = workflow(
        "secrets",
        [
            secret_action(
                "use",
                f"import hashlib\nv = {both}\nprint('out', v)\nprint('err', v, file=sys.stderr)\n"
                "plait_output({'sha': hashlib.sha256(v.encode()).hexdigest()})",
                FROM_FILE="file-tok",
                FROM_ENV="env-tok",
            ),
            secret_action(
                "fail",
                f"v = {both}\nprint('out', v)\nsys.exit('failed with ' + v)",
                FROM_FILE="file-tok",
                FROM_ENV="env-tok",
            ),
            secret_action("leak", "plait_output({'v': os.environ['T']})", T="env-tok"),
        ],
    )
    workflow_id = cluster.submit(spec)
    status = cluster.wait_workflow(workflow_id)
    actions = {a.action_id: a for a in status.actions}
    assert actions["use"].state == wf.ACTION_STATE_SUCCEEDED, actions["use"]
    assert json.loads(actions["use"].outputs_json) == {"sha": sha(f"{FILE_MARK}|{ENV_MARK}")}
    assert actions["fail"].state == wf.ACTION_STATE_FAILED
    assert actions["fail"].exit_code == 1
    assert actions["leak"].state == wf.ACTION_STATE_FAILED
    assert "$PLAIT_OUTPUT holds the value of secret 'env-tok'" in actions["leak"].error.message

    target = cluster.grpc_target
    outputs = {
        "events": plait_cli("events", workflow_id, "-o", "json", coordinator=target),
        "logs fail": plait_cli("logs", workflow_id, "fail", coordinator=target),
        "logs use": plait_cli("logs", workflow_id, "use", "-o", "json", coordinator=target),
        "status": plait_cli("status", workflow_id, coordinator=target),
        "status json": plait_cli("status", workflow_id, "-o", "json", coordinator=target),
    }
    for name, proc in outputs.items():
        assert proc.returncode == 0, (name, proc.stderr)
        for mark in (FILE_MARK, ENV_MARK):
            assert mark not in proc.stdout + proc.stderr, name
    # The tails were reported, redacted where the values stood.
    logs = outputs["logs fail"].stdout
    assert "failed with [redacted:file-tok]|[redacted:env-tok]" in logs, logs
    assert "out [redacted:file-tok]|[redacted:env-tok]" in logs, logs
    assert "[redacted:file-tok]" in outputs["events"].stdout

    # Every byte the coordinator and workerd wrote beside the journal (logs included).
    files = [p for p in cluster.tmp.rglob("*") if p.is_file()]
    assert any(p.name == "plait.db-wal" for p in files)
    for path in files:
        data = path.read_bytes()
        for mark in (FILE_MARK, ENV_MARK):
            assert mark.encode() not in data, path
    for name in ("plait.db", "plait.db-wal", "plait.db-shm", "plait.db.lock", "plait.db.leader"):
        assert stat.S_IMODE(os.stat(cluster.tmp / name).st_mode) == 0o600, name


def test_a_rotated_file_is_read_by_the_next_attempt(
    cluster: Cluster, workerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shared = tmp_path_factory.mktemp("rotation")
    secret_file = shared / "token"
    secret_file.write_text("first-value")
    start(cluster, secret_file)
    code = f"""
import hashlib, time
h = hashlib.sha256(os.environ["TOKEN"].encode()).hexdigest()
if os.environ["PLAIT_ATTEMPT"] == "1":
    with open({str(shared / "seen-1")!r}, "w") as f:
        f.write(h)
    while not os.path.exists({str(shared / "go")!r}):
        time.sleep(0.02)
    sys.exit(3)
plait_output({{"sha": h}})
"""
    action = secret_action("rotate", code, TOKEN="file-tok")
    action.retry.max_attempts = 2
    action.retry.initial_backoff.FromMilliseconds(10)
    workflow_id = cluster.submit(workflow("rotation", [action]))
    wait_for("attempt 1 to read the secret", (shared / "seen-1").exists, 60)
    secret_file.write_text("second-value\n")
    (shared / "go").write_text("")
    status = cluster.wait_workflow(workflow_id)
    (rotate,) = status.actions
    assert rotate.state == wf.ACTION_STATE_SUCCEEDED and rotate.attempt == 2, rotate
    assert (shared / "seen-1").read_text() == sha("first-value")
    assert json.loads(rotate.outputs_json) == {"sha": sha("second-value")}


def test_an_unknown_secret_fails_the_attempt_naming_it_without_retry(
    cluster: Cluster, workerd_available: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    secret_file = tmp_path_factory.mktemp("secrets") / "token"
    secret_file.write_text(FILE_MARK)
    start(cluster, secret_file)
    action = secret_action("ask", "plait_output({})", TOKEN="not-provided")
    action.retry.max_attempts = 3
    status = cluster.wait_workflow(cluster.submit(workflow("unknown", [action])))
    (ask,) = status.actions
    assert ask.state == wf.ACTION_STATE_FAILED and ask.attempt == 1, ask
    assert ask.error.message.startswith(
        "secret 'not-provided' (for $TOKEN): this worker does not provide it"
    ), ask.error


def test_workerd_refuses_a_bad_secret_flag_at_start_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "plait.workerd", "--secret", f"tok=file:{tmp_path / 'absent'}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"--secret tok=file:{tmp_path / 'absent'}: " in proc.stderr
    assert "No such file" in proc.stderr
