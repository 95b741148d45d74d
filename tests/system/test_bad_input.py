"""Bad input gets a clear error through real gRPC (RELIABILITY.md, "Bad input"), and nothing
is stored; an unsafe coordinator configuration refuses to start (exit 2) naming the rule."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from plait.errors import InvalidArgumentError, PlaitError, from_rpc_error
from plait.v1 import workflow_pb2 as wf
from plait.v1 import workflow_service_pb2 as ws
from tests.system.harness import (
    Cluster,
    Daemon,
    HarnessError,
    command_action,
    coordinator_argv,
    daemon_env,
    workflow,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

MAX_ACTIONS = 100_000
MAX_MESSAGE = 4 * 1024 * 1024


def act(action_id: str, needs: tuple[str, ...] = ()) -> wf.ActionSpec:
    return command_action(action_id, ["true"], needs=needs)


def with_timeout(seconds: int, nanos: int = 0) -> wf.WorkflowSpec:
    a = act("a")
    a.timeout.CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
    return workflow("bad-timeout", [a])


def with_attempts(n: int) -> wf.WorkflowSpec:
    a = act("a")
    a.retry.max_attempts = n
    return workflow("attempts", [a])


def too_many() -> wf.WorkflowSpec:
    return workflow("too-many", (act(f"a{i}") for i in range(MAX_ACTIONS + 1)))


# (case id, spec, text the message must contain, regex the violation's field path must match)
SPEC_CASES: list[tuple[str, Callable[[], wf.WorkflowSpec], str, str]] = [
    (
        "cycle",
        lambda: workflow("c", [act("a", ("b",)), act("b", ("a",))]),
        "a -> b -> a",
        r"actions\[[01]\]",
    ),
    ("self-dependency", lambda: workflow("s", [act("a", ("a",))]), "a -> a", r"actions\[0\]"),
    (
        "unknown-need",
        lambda: workflow("u", [act("a", ("ghost",))]),
        "ghost",
        r"actions\[0\]\.needs\[0\]$",
    ),
    (
        "duplicate-id",
        lambda: workflow("d", [act("dup-1"), act("dup-1")]),
        "dup-1",
        r"actions\[1\]\.id$",
    ),
    ("empty-workflow", lambda: workflow("e", []), "", r"actions$"),
    ("dotdot-id", lambda: workflow("i", [act("../x")]), "", r"actions\[0\]\.id$"),
    ("control-char-id", lambda: workflow("i", [act("a\x01b")]), "", r"actions\[0\]\.id$"),
    ("too-long-id", lambda: workflow("i", [act("x" * 129)]), "", r"actions\[0\]\.id$"),
    ("empty-id", lambda: workflow("i", [act("")]), "", r"actions\[0\]\.id$"),
    ("zero-timeout", lambda: with_timeout(0), "", r"actions\[0\]\.timeout$"),
    ("negative-timeout", lambda: with_timeout(-1), "", r"actions\[0\]\.timeout$"),
    ("attempts-over-100", lambda: with_attempts(101), "", r"actions\[0\]\.retry\.max_attempts$"),
    ("too-many-actions", too_many, str(MAX_ACTIONS), r"actions"),
]


@pytest.fixture(scope="module")
def refusing(
    tmp_path_factory: pytest.TempPathFactory, coordinator_available: None
) -> Iterator[Cluster]:
    """One coordinator (no workers) that every refusal case talks to; nothing may be stored."""
    c = Cluster(tmp_path_factory.mktemp("bad-input"))
    try:
        c.start_coordinator()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def coordinator_available() -> None:
    # Module-scoped twin of the conftest fixture, so `refusing` may depend on it.
    import importlib.util

    if importlib.util.find_spec("plait.coordinator.__main__") is None:
        pytest.skip("plait.coordinator.__main__ does not exist yet")


def submit_error(cluster: Cluster, spec: wf.WorkflowSpec) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        cluster.submit(spec)
    return info.value


@pytest.mark.parametrize(
    ("build", "names", "field_re"),
    [pytest.param(b, n, f, id=i) for i, b, n, f in SPEC_CASES],
)
def test_bad_spec_is_refused_naming_the_field(
    refusing: Cluster, build: Callable[[], wf.WorkflowSpec], names: str, field_re: str
) -> None:
    err = submit_error(refusing, build())

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err  # type: ignore[attr-defined]
    back = from_rpc_error(err)
    assert isinstance(back, InvalidArgumentError)
    assert names in back.message
    fields = [v.field for v in back.violations]
    assert any(re.search(field_re, f) for f in fields), f"no violation matches {field_re}: {fields}"
    assert all(v.description for v in back.violations)
    assert refusing.list_workflows() == [], "a refused workflow was stored"


def test_too_many_actions_names_the_limit(refusing: Cluster) -> None:
    back = from_rpc_error(submit_error(refusing, too_many()))

    assert "max_actions" in back.message and str(MAX_ACTIONS) in back.message, back.message


def test_request_over_message_limit_is_resource_exhausted(refusing: Cluster) -> None:
    big = act("a")
    big.input_json = '"' + "x" * (MAX_MESSAGE + 1024) + '"'

    err = submit_error(refusing, workflow("huge", [big]))

    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
    assert str(MAX_MESSAGE) in (err.details() or ""), err  # type: ignore[attr-defined]
    assert refusing.list_workflows() == []


def test_refused_control_characters_are_not_echoed_raw(refusing: Cluster) -> None:
    back: PlaitError = from_rpc_error(submit_error(refusing, workflow("i", [act("a\x1b[31mb")])))

    assert "\x1b" not in back.message


@pytest.mark.parametrize("attempts", [0, 1, 100])
def test_attempts_in_range_are_accepted(cluster: Cluster, attempts: int) -> None:
    # 0 means "inherit the workflow default".
    cluster.start_coordinator()

    workflow_id = cluster.submit(with_attempts(attempts))

    assert [w.workflow_id for w in cluster.list_workflows()] == [workflow_id]
    assert cluster.get(workflow_id).state == wf.WORKFLOW_STATE_RUNNING


def test_submit_refused_before_anything_is_journalled_survives_restart(cluster: Cluster) -> None:
    cluster.start_coordinator()
    submit_error(cluster, workflow("c", [act("a", ("b",)), act("b", ("a",))]))

    cluster.restart("coordinator")

    assert cluster.list_workflows() == []
    reply = cluster.workflows.ListWorkflows(ws.ListWorkflowsRequest(), timeout=10)
    assert not reply.next_page_token


UNSAFE_CONFIGS = [
    pytest.param(
        {"--lease-ttl": "1s", "--heartbeat-interval": "500ms"},
        ("lease", "heartbeat"),
        id="ttl-under-5x-heartbeat",
    ),
    pytest.param({"--kill-grace": "1s"}, ("kill", "grace"), id="kill-grace-over-ttl-third"),
    pytest.param(
        {"--listen": "0.0.0.0:0"}, ("tls", "authentication"), id="non-loopback-without-tls"
    ),
    pytest.param(
        {"--metrics-listen": "0.0.0.0:0"}, ("--metrics-public",), id="public-metrics-unasked"
    ),
]


@pytest.mark.parametrize(("overrides", "words"), UNSAFE_CONFIGS)
def test_unsafe_config_refuses_to_start(
    tmp_path: Path,
    coordinator_available: None,
    overrides: dict[str, str],
    words: tuple[str, ...],
) -> None:
    ready = tmp_path / "ready.json"
    argv = coordinator_argv(
        store=f"sqlite:///{tmp_path}/plait.db", ready_file=ready, overrides=overrides
    )
    daemon = Daemon("coordinator", argv, daemon_env(), tmp_path / "coordinator.log")
    daemon.start()
    try:
        code = daemon.wait(20.0)
    finally:
        daemon.stop()
    output = daemon.log_tail()
    if code is None:
        raise HarnessError(f"coordinator started with an unsafe config {overrides}:\n{output}")
    assert code == 2, f"exit {code}, want 2:\n{output}"
    lowered = output.lower()
    assert all(w in lowered for w in words), f"the rule is not named ({words}):\n{output}"
    assert "traceback" not in lowered, output
    assert not ready.exists()
