"""``secrets`` and ``rlimits`` in workflow files, the builder, submit validation and the core.

The converter names the file, the action and the field; the coordinator refuses the same
mistakes INVALID_ARGUMENT naming the field path and the limit; map children and pipeline stages
carry the keys to their leases; a worker's FAILED_PRECONDITION (a secret it does not provide)
is not retried.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.rpc import code_pb2, status_pb2

from plait.coordinator.config import Limits
from plait.errors import InvalidArgumentError
from plait.exec_rules import MAX_SECRETS
from plait.sizes import format_size, parse_size
from plait.spec import SpecError, Workflow, loads_workflow
from plait.spec.validate import validate_submit
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from tests.unit.core_driver import Driver, grants

FLOW = """
name: deploy
actions:
  - id: push
    run: [deploy.sh]
    secrets: [API_TOKEN]
    rlimits: {processes: 64, address_space: 4GiB, file_size: 100MB, open_files: 256, cpu: 10m}
  - id: db
    run: migrate
    secrets: {DB_PASSWORD: prod.db-password, API_TOKEN: API_TOKEN}
    rlimits: {cpu: 90}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        loads_workflow(text, source="flow.yaml")
    return err.value.lines


def one_action(body: str) -> str:
    return "name: t\nactions:\n  - id: a\n" + "".join(f"    {line}\n" for line in body.splitlines())


# ----- sizes ----------------------------------------------------------------------------------


def test_sizes() -> None:
    assert parse_size("100MiB") == 100 << 20
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5 gib") == 3 << 29
    assert parse_size(512) == parse_size("512") == parse_size("512B") == 512
    for bad in ("lots", "-1", "1XB", "", True, -5, float("nan")):
        with pytest.raises(ValueError, match=r"rlimits\.file_size: expected a size"):
            parse_size(bad, field="rlimits.file_size")
    assert format_size(4 << 30) == "4GiB" and format_size(1536) == "1.5KiB"


# ----- YAML -----------------------------------------------------------------------------------


def test_yaml_secrets_and_rlimits() -> None:
    spec = loads_workflow(FLOW, source="flow.yaml")
    push, db = spec.actions
    assert dict(push.secrets) == {"API_TOKEN": "API_TOKEN"}
    assert dict(db.secrets) == {"DB_PASSWORD": "prod.db-password", "API_TOKEN": "API_TOKEN"}
    assert push.rlimits == pb.ExecLimits(
        processes=64,
        address_space_bytes=4 << 30,
        file_size_bytes=100_000_000,
        open_files=256,
        cpu_seconds=600,
    )
    assert db.rlimits == pb.ExecLimits(cpu_seconds=90)
    assert not db.env  # secrets never become plain env of the spec


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "run: x\nsecrets: [api-token]",
            "flow.yaml: actions[0] (id 'a'): secrets[0]: variable 'api-token' must be"
            " [A-Z_][A-Z0-9_]*",
        ),
        ("run: x\nsecrets: [api-token]", "write {VARIABLE: api-token}"),
        ("run: x\nsecrets: {PATH: p}", "secrets.PATH: variable 'PATH' is set by the sandbox"),
        ("run: x\nsecrets: {PLAIT_TOKEN: p}", "secrets.PLAIT_TOKEN: variable 'PLAIT_TOKEN'"),
        ("run: x\nsecrets: {T: ../etc}", "secrets.T: secret name '../etc' must be"),
        ("run: x\nsecrets: {T: 7}", "secrets.T: expected a secret name, got 7"),
        ("run: x\nsecrets: [A, A]", "secrets[1]: 'A' is listed twice"),
        ("run: x\nenv: {T: v}\nsecrets: [T]", "secrets[0]: 'T' is also set in env"),
        ("run: x\nsecrets: TOKEN", "secrets: expected a list of secret names"),
        ("handler: h\nsecrets: [T]", "secrets: applies to exec actions (run)"),
        ("handler: h\nrlimits: {cpu: 1}", "rlimits: applies to exec actions (run)"),
        ("run: x\nrlimits: {cpu: 1.5s}", "rlimits.cpu: is applied in whole seconds"),
        ("run: x\nrlimits: {cpu: soon}", "rlimits.cpu: expected CPU time such as 90s"),
        ("run: x\nrlimits: {file_size: lots}", "rlimits.file_size: expected a size such as"),
        ("run: x\nrlimits: {address_space: 0}", "rlimits.address_space: must be from 1B to"),
        ("run: x\nrlimits: {open_files: 0}", "leave it out for the worker's default"),
        ("run: x\nrlimits: {processes: 99999999}", "rlimits.processes: must be from 1 to 4194304"),
        ("run: x\nrlimits: {processes: true}", "rlimits.processes: expected a whole number"),
        ("run: x\nrlimits: {core: 0}", "rlimits.core: unknown key 'core'; allowed rlimits keys"),
        ("run: x\nrlimits: 5", "rlimits: expected a mapping with keys processes, address_space"),
    ],
)
def test_yaml_errors_name_file_action_and_field(body: str, expected: str) -> None:
    lines = problems(one_action(body))
    assert any(expected in line for line in lines), lines


def test_too_many_secrets() -> None:
    names = ", ".join(f"S{i}" for i in range(MAX_SECRETS + 1))
    (line,) = problems(one_action(f"run: x\nsecrets: [{names}]"))
    assert line.endswith(f"secrets: names {MAX_SECRETS + 1} secrets; the limit is {MAX_SECRETS}")


def test_map_children_and_pipeline_stages() -> None:
    text = """
name: t
actions:
  - id: list
    run: [ls]
  - id: each
    needs: [list]
    map: list.items
    run: [upload, "{{ item }}"]
    secrets: [API_TOKEN]
  - id: flow
    needs: [list]
    pipeline:
      over: list.items
      stages:
        - {id: fetch, run: [fetch], secrets: [API_TOKEN], rlimits: {cpu: 60}}
        - {id: index, handler: index}
"""
    spec = loads_workflow(text, source="flow.yaml")
    assert dict(spec.actions[1].secrets) == {"API_TOKEN": "API_TOKEN"}
    fetch = spec.actions[2].pipeline.stages[0]
    assert dict(fetch.secrets) == {"API_TOKEN": "API_TOKEN"} and fetch.rlimits.cpu_seconds == 60
    lines = problems(text.replace("    pipeline:\n", "    secrets: [API_TOKEN]\n    pipeline:\n"))
    expected = (
        "flow.yaml: actions[2] (id 'flow'): secrets: a pipeline runs its stages: give secrets"
        " to the stages that run commands"
    )
    assert expected in lines, lines
    lines = problems(
        text.replace("{id: index, handler: index}", "{id: index, handler: index, secrets: [T]}")
    )
    assert any("(id 'flow') (id 'index'): secrets: applies to exec actions" in x for x in lines)


# ----- builder --------------------------------------------------------------------------------


def test_builder_matches_yaml() -> None:
    wf = Workflow("deploy")
    wf.exec(
        "push",
        ["deploy.sh"],
        secrets=["API_TOKEN"],
        rlimits={
            "processes": 64,
            "address_space": "4GiB",
            "file_size": "100MB",
            "open_files": 256,
            "cpu": timedelta(minutes=10),
        },
    )
    wf.exec(
        "db",
        "migrate",
        secrets={"DB_PASSWORD": "prod.db-password", "API_TOKEN": "API_TOKEN"},
        rlimits={"cpu": 90},
    )
    built = wf.to_spec()
    from_yaml = loads_workflow(FLOW, source="flow.yaml")
    for a, b in zip(built.actions, from_yaml.actions, strict=True):
        assert (dict(a.secrets), a.rlimits) == (dict(b.secrets), b.rlimits)


def test_builder_fails_at_the_call_naming_the_builder() -> None:
    wf = Workflow("w")
    with pytest.raises(SpecError) as err:
        wf.handler("h", "index", secrets=["TOKEN"])
    assert err.value.lines == [
        "Workflow('w'): actions[0] (id 'h'): secrets: applies to exec actions (run); a handler"
        " is configured by its worker"
    ]
    with pytest.raises(SpecError, match=r"rlimits.address_space: expected a size"):
        wf.exec("e", ["x"], rlimits={"address_space": "big"})


# ----- submit validation ----------------------------------------------------------------------


def exec_spec(**fields: object) -> pb.WorkflowSpec:
    a = pb.ActionSpec(id="a", exec=pb.ExecAction(argv=["x"]), **fields)  # type: ignore[arg-type]
    return pb.WorkflowSpec(name="t", actions=[a])


def violations(spec: pb.WorkflowSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgumentError) as err:
        validate_submit(spec, "", Limits())
    return {v.field: v.description for v in err.value.violations}


def test_submit_accepts_what_the_converter_makes() -> None:
    validate_submit(loads_workflow(FLOW, source="flow.yaml"), "", Limits())


def test_submit_refuses_bad_secrets_naming_field_and_rule() -> None:
    got = violations(
        exec_spec(
            secrets={"lower": "x", "HOME": "x", "PLAIT_X": "x", "OK": "../x", "E": "x"},
            env={"E": "1"},
        )
    )
    assert "must be [A-Z_][A-Z0-9_]*" in got["spec.actions[0].secrets['lower']"]
    assert "set by the sandbox itself" in got["spec.actions[0].secrets['HOME']"]
    assert "set by the sandbox itself" in got["spec.actions[0].secrets['PLAIT_X']"]
    assert "secret name '../x' must be" in got["spec.actions[0].secrets['OK']"]
    assert "also set in env" in got["spec.actions[0].secrets['E']"]
    long_name = "A" * 129
    got = violations(exec_spec(secrets={long_name: "x"}))
    assert "129 characters long; the limit is 128" in got[f"spec.actions[0].secrets['{long_name}']"]
    got = violations(exec_spec(secrets={f"S{i}": "x" for i in range(MAX_SECRETS + 1)}))
    assert got == {
        "spec.actions[0].secrets": f"action 'a': names {MAX_SECRETS + 1} secrets; the limit is"
        f" {MAX_SECRETS}"
    }


def test_submit_refuses_rlimits_over_their_bound() -> None:
    got = violations(
        exec_spec(rlimits=pb.ExecLimits(address_space_bytes=1 << 60, open_files=1 << 21))
    )
    assert got == {
        "spec.actions[0].rlimits.address_space_bytes": "action 'a': is 1.04858e+06TiB; the limit"
        " is 128TiB",
        "spec.actions[0].rlimits.open_files": "action 'a': is 2097152; the limit is 1048576",
    }


def test_submit_refuses_secrets_and_rlimits_off_exec() -> None:
    s = pb.WorkflowSpec(name="t")
    s.actions.add(id="h", handler="h", secrets={"T": "t"}, rlimits=pb.ExecLimits(cpu_seconds=1))
    p = s.actions.add(id="p", secrets={"T": "t"})
    p.pipeline.stages.add(id="s", handler="h", secrets={"T": "t"})
    p.pipeline.over = "h.items"
    p.needs.append("h")
    got = violations(s)
    assert got["spec.actions[0].secrets"] == "action 'h': secrets apply to exec actions only"
    assert got["spec.actions[0].rlimits"] == "action 'h': rlimits apply to exec actions only"
    assert got["spec.actions[1].secrets"] == "action 'p': secrets apply to exec actions only"
    assert "spec.actions[1].pipeline.stages[0].secrets" in got


# ----- the core: leases carry them; a worker that cannot run one is not retried ---------------


def start(spec: pb.WorkflowSpec) -> tuple[Driver, list[wpb.Lease]]:
    """A core with one exec worker (session s1); the leases granted at submit."""
    d = Driver()
    d.hello_with("s1", wpb.Hello(worker_id="w1", slots=8, exec_enabled=True))
    return d, grants(d.submit(spec))


def finish(d: Driver, lease: wpb.Lease, **result: object) -> list[wpb.Lease]:
    res = wpb.ActionResult(
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        **result,  # type: ignore[arg-type]
    )
    leases = grants(d.msg("s1", action_finished=wpb.ActionFinished(results=[res], credit=1)))
    return leases + grants(d.advance(1.0))


def test_map_children_and_stages_carry_secrets_to_their_leases() -> None:
    spec = loads_workflow(
        """
name: t
actions:
  - {id: list, run: [ls]}
  - {id: each, needs: [list], map: list.items, run: [up], secrets: [TOKEN], rlimits: {cpu: 5}}
  - id: flow
    needs: [list]
    pipeline: {over: list.items, stages: [{id: s, run: [f], secrets: {K: key}}]}
""",
        source="t.yaml",
    )
    d, (lst,) = start(spec)
    leases = finish(d, lst, outcome=wpb.ACTION_OUTCOME_SUCCEEDED, outputs_json='{"items":[1,2]}')
    by_id = {x.action_id: x for x in leases}
    for child in ("each.0", "each.1"):
        assert dict(by_id[child].action.secrets) == {"TOKEN": "TOKEN"}
        assert by_id[child].action.rlimits.cpu_seconds == 5
    stage = by_id["flow.0.s"]
    assert dict(stage.action.secrets) == {"K": "key"}


@pytest.mark.parametrize(
    ("code", "retryable_errors", "attempts"),
    [
        (code_pb2.FAILED_PRECONDITION, [], 1),  # the worker cannot run it: no retry
        (code_pb2.UNKNOWN, [], 3),  # any other failure: the retry policy as before
        (code_pb2.FAILED_PRECONDITION, ["FAILED_PRECONDITION"], 3),  # unless asked for
    ],
)
def test_failed_precondition_from_a_worker_is_not_retried(
    code: int, retryable_errors: list[str], attempts: int
) -> None:
    spec = exec_spec(secrets={"TOKEN": "tok"})
    spec.actions[0].retry.max_attempts = 3
    spec.actions[0].retry.retryable_errors.extend(retryable_errors)
    spec.actions[0].retry.initial_backoff.FromMilliseconds(1)
    d, leases = start(spec)
    seen = 0
    while leases:
        seen += 1
        (lease,) = leases
        err = status_pb2.Status(code=code, message="secret 'tok' (for $TOKEN): not provided")
        leases = finish(d, lease, outcome=wpb.ACTION_OUTCOME_FAILED, error=err)
    assert seen == attempts
    assert d.state("a") == "ACTION_STATE_FAILED"
