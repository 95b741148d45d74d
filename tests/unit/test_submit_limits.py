"""What a submission may be, checked on the client before anything is sent (plait.submission),
the workflow-wide env (sent once, added to each exec lease), and the SDK's exports and states."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import plait
from plait.client import Client
from plait.coordinator.core.workflow_env import add_workflow_env, workflow_env_bytes
from plait.errors import ConfigError, InvalidArgumentError
from plait.limits import Limits
from plait.results import ActionState, WorkflowResult, WorkflowState
from plait.spec import Workflow, loads_workflow
from plait.spec.validate import validate_submit
from plait.submission import SubmitLimits, check_spec, stream_requests
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as wspb

ROOT = Path(__file__).resolve().parents[2]


def _spec(n: int, **fields: str) -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec(name="t")
    for i in range(n):
        spec.actions.add(id=f"a{i}", handler="h", **fields)
    return spec


# ---------------------------------------------------------------- local limit checks


def test_a_50mb_input_is_refused_at_once_naming_the_field_and_the_limit() -> None:
    wf = Workflow("big")
    t0 = time.perf_counter()
    wf.handler("load", "h", input={"blob": "x" * (50 * 1024 * 1024)})
    # Nothing listens on port 1: had the check let it through, the call would fail UNAVAILABLE.
    with (
        Client("127.0.0.1:1", tls=False, token="") as client,
        pytest.raises(InvalidArgumentError) as err,
    ):
        client.submit(wf)
    assert time.perf_counter() - t0 < 5  # well under a second on an idle machine
    [v] = err.value.violations
    assert v.field == "spec.actions[0].input_json"
    assert "max_input_bytes is 1,048,576" in v.description
    assert "is 52,428,811 bytes" in v.description  # {"blob":"x…"}


def test_too_many_actions_and_too_many_bytes_are_named() -> None:
    limits = SubmitLimits(max_actions=3, max_spec_bytes=10, max_input_bytes=10**6)
    with pytest.raises(InvalidArgumentError) as err:
        check_spec(_spec(4), limits)
    fields = {v.field: v.description for v in err.value.violations}
    assert fields["spec.actions"] == "has 4 actions; the limit max_actions is 3"
    assert "the limit max_spec_bytes is 10" in fields["spec"]
    assert check_spec(_spec(2), SubmitLimits()) == _spec(2).ByteSize()


def test_pipeline_stage_inputs_are_checked_and_utf8_bytes_count() -> None:
    spec = pb.WorkflowSpec(name="t")
    a = spec.actions.add(id="p")
    a.pipeline.stages.add(id="s", handler="h", input_json='"' + "é" * 600 + '"')  # 1,202 bytes
    with pytest.raises(InvalidArgumentError) as err:
        check_spec(spec, SubmitLimits(max_input_bytes=1000))
    [v] = err.value.violations
    assert v.field == "spec.actions[0].pipeline.stages[0].input_json"
    assert v.description.startswith("is 1,202 bytes")


def test_the_limits_follow_the_coordinators_variables() -> None:
    assert SubmitLimits.from_env({}) == SubmitLimits(
        Limits().max_actions, Limits().max_spec_bytes, Limits().max_input_bytes
    )
    got = SubmitLimits.from_env(
        {
            "PLAIT_MAX_ACTIONS": "200000",
            "PLAIT_MAX_SPEC_BYTES": "128MiB",
            "PLAIT_MAX_INPUT_BYTES": "2MiB",
        }
    )
    assert got == SubmitLimits(200_000, 128 << 20, 2 << 20)
    with pytest.raises(ConfigError, match="PLAIT_MAX_SPEC_BYTES: expected a size"):
        SubmitLimits.from_env({"PLAIT_MAX_SPEC_BYTES": "lots"})


def _plait(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "plait.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )


def test_plait_submit_exits_2_naming_the_limit_before_dialling(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text("actions:\n  - {id: a, handler: h, input: {blob: " + "x" * 3000 + "}}\n")
    # Port 1 answers nothing: exit 3 would mean the spec was sent.
    done = _plait(
        "submit", str(flow), "--coordinator", "127.0.0.1:1", env={"PLAIT_MAX_INPUT_BYTES": "1KiB"}
    )
    assert done.returncode == 2, done.stderr
    assert "spec.actions[0].input_json" in done.stderr
    assert "the limit max_input_bytes is 1,024" in done.stderr


# ---------------------------------------------------------------- pieces


def test_a_spec_in_pieces_joins_back_whole() -> None:
    spec = _spec(5000, input_json='{"k": "' + "v" * 100 + '"}')
    request = wspb.SubmitWorkflowRequest(spec=spec, idempotency_key="k", traceparent="")
    request.hlc.physical_ms = 7
    pieces = list(stream_requests(request, chunk_bytes=64 * 1024))
    assert len(pieces) == -(-spec.ByteSize() // (64 * 1024))
    assert pieces[0].header.idempotency_key == "k" and pieces[0].header.hlc.physical_ms == 7
    assert not pieces[0].header.HasField("spec")
    assert all(not p.HasField("header") for p in pieces[1:])
    assert all(len(p.SerializeToString()) < 70 * 1024 for p in pieces)
    again = pb.WorkflowSpec.FromString(b"".join(p.spec_chunk for p in pieces))
    assert again == spec


# ---------------------------------------------------------------- the workflow's env


def test_the_workflow_env_goes_to_exec_actions_beneath_their_own() -> None:
    spec = loads_workflow(
        "env: {MODE: fast, TOKEN: top, WHERE: top}\n"
        "actions:\n"
        "  - {id: a, run: [x], env: {WHERE: mine}, secrets: [TOKEN]}\n"
        "  - {id: b, handler: h}\n"
        "  - id: p\n"
        "    needs: [a]\n"
        "    pipeline: {over: a.items, stages: [{id: s, run: [y]}, {id: t, handler: h}]}\n"
    )
    assert dict(spec.env) == {"MODE": "fast", "TOKEN": "top", "WHERE": "top"}
    leased = [pb.ActionSpec() for _ in spec.actions]
    for copy, action in zip(leased, spec.actions, strict=True):
        copy.CopyFrom(action)
        add_workflow_env(copy, spec.env)
    a, b, p = leased
    assert dict(a.env) == {"MODE": "fast", "WHERE": "mine"}  # TOKEN comes from its secret
    assert not b.env  # handlers get none, as before
    assert dict(p.pipeline.stages[0].env) == {"MODE": "fast", "TOKEN": "top", "WHERE": "top"}
    assert not p.pipeline.stages[1].env
    assert workflow_env_bytes(spec.env) >= pb.WorkflowSpec(env=spec.env).ByteSize()
    assert workflow_env_bytes({}) == 0


def test_the_workflow_env_is_validated_like_an_actions() -> None:
    spec = _spec(1)
    spec.env["A=B"] = "x"
    spec.env["NUL"] = "a\0b"
    with pytest.raises(InvalidArgumentError) as err:
        validate_submit(spec, "", Limits())
    fields = sorted(v.field for v in err.value.violations)
    assert fields == ["spec.env", "spec.env['NUL']"]
    big = _spec(1)
    big.env.update({f"K{i}": "v" for i in range(3)})
    with pytest.raises(InvalidArgumentError, match="the limit max_env is 2"):
        validate_submit(big, "", Limits(max_env=2))


def test_a_100k_action_file_no_longer_carries_the_dir_per_action(tmp_path: Path) -> None:
    from plait.spec import load_workflow

    flow = tmp_path / "wide.yaml"
    flow.write_text("actions:\n" + "".join(f"  - {{id: a{i}, run: [true]}}\n" for i in range(2000)))
    spec = load_workflow(flow)
    assert spec.env["PLAIT_WORKFLOW_DIR"] == str(tmp_path.resolve())
    per_action = (spec.ByteSize() - pb.WorkflowSpec(env=spec.env).ByteSize()) / 2000
    assert per_action < 20  # id and argv only (it was about 76 with the directory)


# ---------------------------------------------------------------- exports and states


def test_every_name_in_plait_all_resolves_and_dir_lists_it() -> None:
    for name in plait.__all__:
        assert getattr(plait, name) is not None, name
    listed = dir(plait)
    for name in ("Client", "Workflow", "Worker", "WorkflowResult", "WorkflowState", "run_local"):
        assert name in plait.__all__ and name in listed
    with pytest.raises(AttributeError):
        plait.NoSuchThing  # noqa: B018


def test_states_equal_their_numbers_and_their_names() -> None:
    s = WorkflowState(pb.WORKFLOW_STATE_SUCCEEDED)
    assert s == pb.WORKFLOW_STATE_SUCCEEDED == 2
    assert s == "SUCCEEDED" and s == "succeeded" and s == "WORKFLOW_STATE_SUCCEEDED"
    assert s != "FAILED" and s != 3
    assert str(s) == "SUCCEEDED" and s.terminal and s.succeeded
    assert s in {pb.WORKFLOW_STATE_SUCCEEDED}  # hashes as the number
    assert pb.WorkflowState.Name(s) == "WORKFLOW_STATE_SUCCEEDED"
    assert not WorkflowState.RUNNING.terminal
    assert ActionState(5) == "SUCCEEDED" and ActionState.TIMED_OUT.terminal
    assert not ActionState.RUNNING.terminal
    # Every protocol value has a name here.
    assert {int(m) for m in WorkflowState} == set(pb.WorkflowState.values())
    assert {int(m) for m in ActionState} == set(pb.ActionState.values())


def test_a_result_names_states_and_parses_outputs() -> None:
    status = pb.WorkflowStatus(workflow_id="wf-1", name="t", state=pb.WORKFLOW_STATE_FAILED)
    status.actions.add(action_id="a", state=pb.ACTION_STATE_SUCCEEDED, outputs_json='{"n": 1}')
    failed = status.actions.add(action_id="b", state=pb.ACTION_STATE_FAILED, exit_code=3)
    failed.error.message = "boom"
    result = WorkflowResult.from_status(status)
    assert result.state == "FAILED" and not result.ok
    assert result.outputs("a") == {"n": 1}
    assert result.actions["b"].error == "boom" and result.actions["b"].exit_code == 3
    assert result.states() == {"a": "SUCCEEDED", "b": "FAILED"}
    assert result.actions["b"].outputs is None and result.status is status


def test_worker_run_shows_its_log_lines_unless_logging_is_set_up() -> None:
    code = (
        "import logging\n"
        "from plait.worker.serve import default_logging\n"
        "default_logging()\n"
        "logging.getLogger('plait.worker.session').info('connected to x')\n"
        "logging.getLogger('other').info('not ours')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "INFO plait.worker.session: connected to x" in done.stderr
    assert "not ours" not in done.stderr
    configured = "import logging\nlogging.basicConfig(level=logging.ERROR)\n" + code
    done = subprocess.run(
        [sys.executable, "-c", configured], capture_output=True, text=True, timeout=60, check=False
    )
    assert "connected to x" not in done.stderr  # the program's own setup is left alone
