"""The one RPC-to-role table: complete, documented, and what the Authenticator enforces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from plait.coordinator.auth import (
    ANONYMOUS_OPEN,
    PUBLIC,
    RPC_ROLES,
    WORKER_CONNECT,
    Authenticator,
    plait_methods,
)
from plait.errors import PermissionDeniedError, UnauthenticatedError
from plait.security import Role, TokenEntry, hash_token, new_token, token_file_text
from tests.tlsfixtures import Pki, pki  # noqa: F401

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_every_plait_rpc_has_a_role() -> None:
    missing = [m for m in plait_methods() if m not in RPC_ROLES]
    assert not missing, f"RPCs without a role in plait.coordinator.auth.RPC_ROLES: {missing}"


def test_security_doc_lists_every_plait_rpc_with_its_role() -> None:
    text = DOC.read_text()
    for method in plait_methods():
        service, name = method.strip("/").split("/")
        short = f"{service.rsplit('.', 1)[1]}.{name}"
        role = RPC_ROLES[method]
        row = re.search(rf"\| `{re.escape(short)}` \| `(\w+)` \|", text)
        assert row is not None, f"docs/security.md does not list {short}"
        assert row.group(1) == str(role), f"{short}: doc says {row.group(1)}, table says {role}"


class FakeContext:
    """What the interceptor reads from a grpc.aio ServicerContext: auth context and metadata."""

    def __init__(self, pem: bytes | None = None, token: str | None = None) -> None:
        self._auth = {"x509_pem_cert": [pem]} if pem else {}
        self._md = (("authorization", f"Bearer {token}"),) if token is not None else ()

    def auth_context(self) -> dict[str, Any]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[str, dict[str, str]]:
    made = {"reader": new_token(), "w1": new_token(), "op": new_token()}
    roles = {"reader": Role.READ, "w1": Role.WORKER, "op": Role.OPERATE}
    path = tmp_path / "t.toml"
    path.write_text(
        token_file_text(
            TokenEntry(n, frozenset({roles[n]}), hash_token(t)) for n, t in made.items()
        )
    )
    return str(path), made


SUBMIT = "/plait.v1.WorkflowService/SubmitWorkflow"


def test_authentication_off_gives_every_role() -> None:
    auth = Authenticator(tls=False, mtls=False, token_file=None)
    assert not auth.enabled
    assert auth.authenticate(SUBMIT, FakeContext()) is ANONYMOUS_OPEN
    assert auth.authenticate(WORKER_CONNECT, FakeContext()).roles == frozenset(Role)


def test_unknown_method_is_refused_even_with_authentication_off() -> None:
    auth = Authenticator(tls=False, mtls=False, token_file=None)
    with pytest.raises(PermissionDeniedError, match="no role"):
        auth.authenticate("/plait.v1.WorkflowService/DropEverything", FakeContext())


def test_tokens_on_loopback(tokens: tuple[str, dict[str, str]]) -> None:
    path, made = tokens
    auth = Authenticator(tls=False, mtls=False, token_file=path)
    with pytest.raises(UnauthenticatedError, match="needs role 'submit'"):
        auth.authenticate(SUBMIT, FakeContext())
    with pytest.raises(UnauthenticatedError, match="not valid") as bad:
        auth.authenticate(SUBMIT, FakeContext(token="plait_" + "x" * 43))
    assert "x" * 43 not in bad.value.message
    with pytest.raises(PermissionDeniedError, match="needs role 'submit'; token:reader"):
        auth.authenticate(SUBMIT, FakeContext(token=made["reader"]))
    assert Role.SUBMIT in auth.authenticate(SUBMIT, FakeContext(token=made["op"])).roles
    worker = auth.authenticate(WORKER_CONNECT, FakeContext(token=made["w1"]))
    assert worker.worker_id == "w1"
    with pytest.raises(PermissionDeniedError):
        auth.authenticate(WORKER_CONNECT, FakeContext(token=made["op"]))
    # Health stays public.
    public = [m for m, r in RPC_ROLES.items() if r == PUBLIC]
    assert public and auth.authenticate(public[0], FakeContext()).roles == frozenset()


def test_certificates_under_mtls(pki: Pki, tokens: tuple[str, dict[str, str]]) -> None:  # noqa: F811
    path, made = tokens
    auth = Authenticator(tls=True, mtls=True, token_file=path)
    w1 = pki.worker("w1").pem()[1]
    operator = pki.user("operator").pem()[1]
    nobody = pki.user("nobody").pem()[1]
    assert auth.authenticate(WORKER_CONNECT, FakeContext(w1)).worker_id == "w1"
    with pytest.raises(PermissionDeniedError, match="needs role 'submit'; worker:w1"):
        auth.authenticate(SUBMIT, FakeContext(w1))
    assert auth.authenticate(SUBMIT, FakeContext(operator)).via == "certificate"
    with pytest.raises(PermissionDeniedError, match="roles none"):
        auth.authenticate(SUBMIT, FakeContext(nobody))
    # A role-less certificate with a token: the token names the caller.
    by_token = auth.authenticate(SUBMIT, FakeContext(nobody, made["op"]))
    assert by_token.name == "token:op" and by_token.via == "token"
    # With TLS, a worker must prove its id with a certificate; a worker token is not enough.
    with pytest.raises(UnauthenticatedError, match="requires a client certificate"):
        auth.authenticate(WORKER_CONNECT, FakeContext(None, made["w1"]))
    # A user certificate cannot serve as a worker.
    with pytest.raises(PermissionDeniedError, match="needs role 'worker'; user:operator"):
        auth.authenticate(WORKER_CONNECT, FakeContext(operator))
