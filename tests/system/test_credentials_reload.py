"""The coordinator daemon re-reads its token file on SIGHUP (a real process, a real signal)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest

from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from plait.v1 import workflow_service_pb2 as ws
from plait.v1 import workflow_service_pb2_grpc as ws_grpc
from tests.system.harness import Daemon, coordinator_argv, daemon_env, wait_for

pytestmark = pytest.mark.system


def _list(target: str, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            ws_grpc.WorkflowServiceStub(channel).ListWorkflows(
                ws.ListWorkflowsRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_sighup_reloads_the_token_file_and_a_bad_file_keeps_the_old_one(
    tmp_path: Path, coordinator_available: None
) -> None:
    alice, bob = new_token(), new_token()
    entry = {
        n: TokenEntry(n, frozenset({Role.READ}), hash_token(t))
        for n, t in (("alice", alice), ("bob", bob))
    }
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(token_file_text([entry["alice"]]))
    ready = tmp_path / "ready.json"
    argv = coordinator_argv(
        store=f"sqlite:///{tmp_path}/plait.db",
        ready_file=ready,
        overrides={"--auth-tokens": str(tokens)},
    )
    daemon = Daemon("coordinator", argv, daemon_env(), tmp_path / "coordinator.log")
    daemon.start()
    try:
        role = lambda: ready.exists() and json.loads(ready.read_text()).get("role")  # noqa: E731
        wait_for("the coordinator to lead", lambda: role() == "leader", timeout=30)
        target = json.loads(ready.read_text())["grpc"]
        assert _list(target, alice) == grpc.StatusCode.OK
        assert _list(target, bob) == grpc.StatusCode.UNAUTHENTICATED

        # Revoke alice, add bob, and signal: the next calls see the new file.
        tokens.write_text(token_file_text([entry["bob"]]))
        daemon.send(signal.SIGHUP)
        wait_for("the reload", lambda: "token file reloaded: 1 tokens" in daemon.log_tail())
        assert _list(target, alice) == grpc.StatusCode.UNAUTHENTICATED
        assert _list(target, bob) == grpc.StatusCode.OK

        # A file that does not parse is refused; bob's token stays in force.
        tokens.write_text("[[tokens]]\nname = 'broken'\n")
        daemon.send(signal.SIGHUP)
        wait_for("the refusal", lambda: "token file not reloaded" in daemon.log_tail())
        assert daemon.running()
        assert _list(target, bob) == grpc.StatusCode.OK
    finally:
        daemon.stop()
    assert bob not in daemon.log_tail() and alice not in daemon.log_tail()
