"""Coordinator address lists: parsing, following a leader, a call's walk, the worker's choice."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from plait.client import Client, resolve_target
from plait.endpoints import (
    Endpoints,
    Failover,
    TargetError,
    not_leader_of,
    parse_targets,
    resolve_targets,
)
from plait.errors import ConfigError, NotLeaderError
from plait.security import TlsFiles
from plait.worker import SessionConfig
from plait.worker.backoff import Backoff
from plait.worker.connect import CoordinatorLinks


def refusal(leader: str | None) -> grpc.aio.AioRpcError:
    """What a standby's refusal looks like to a caller."""
    status = NotLeaderError(leader).to_status()
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, details=status.message
    )


def unreachable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused"
    )


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:7450", ("10.0.0.1:7450",)),
        ("10.0.0.1:7450,10.0.0.2:7450", ("10.0.0.1:7450", "10.0.0.2:7450")),
        (" a.example:1 , b-2.example:65535 ", ("a.example:1", "b-2.example:65535")),
        ("a:1,a:1,b:2", ("a:1", "b:2")),
        ("[::1]:7450,localhost:7450", ("[::1]:7450", "localhost:7450")),
    ],
)
def test_parse_targets(text: str, expected: tuple[str, ...]) -> None:
    assert parse_targets(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", "--coordinator: 'x' is not HOST:PORT"),
        ("a:1,x", "--coordinator: 'x' is not HOST:PORT"),
        ("a:1, b ", "--coordinator: 'b' is not HOST:PORT"),
        ("a:0", "--coordinator: 'a:0' is not HOST:PORT"),
        ("a:65536", "--coordinator: 'a:65536' is not HOST:PORT"),
        (":7450", "--coordinator: ':7450' is not HOST:PORT"),
        ("a:port", "--coordinator: 'a:port' is not HOST:PORT"),
        ("a b:1", "--coordinator: 'a b:1' is not HOST:PORT"),
        ("a:1,,b:2", "--coordinator: empty address in 'a:1,,b:2'"),
        (" , ", "--coordinator: no coordinator address given"),
    ],
)
def test_bad_entries_name_the_field(text: str, message: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_targets(text)
    assert str(info.value) == message
    # Both a configuration error (CLI exit 2) and a ValueError (dataclass validation).
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)


def test_resolve_targets_from_argument_environment_default() -> None:
    env = {"PLAIT_COORDINATOR": "e1:1,e2:2"}
    assert resolve_targets("a:1,b:2", environ=env) == ("a:1", "b:2")
    assert resolve_targets(["a:1", "b:2"], environ=env) == ("a:1", "b:2")
    assert resolve_targets(None, environ=env) == ("e1:1", "e2:2")
    assert resolve_targets(None, environ={}) == ("127.0.0.1:7450",)
    with pytest.raises(TargetError, match=r"^PLAIT_COORDINATOR: 'nope' is not HOST:PORT$"):
        resolve_targets(None, environ={"PLAIT_COORDINATOR": "nope"})


def test_client_and_session_config_check_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_COORDINATOR", "e1:1,e2:2")
    assert resolve_target() == "e1:1,e2:2"
    with Client() as client:
        assert client.targets == ("e1:1", "e2:2")
        assert client.target == "e1:1"
    with pytest.raises(TargetError, match=r"^--coordinator: 'x' is not HOST:PORT$"):
        Client("a:1,x")
    assert SessionConfig("w1", coordinator="a:1,b:2").coordinator == "a:1,b:2"
    with pytest.raises(ValueError, match=r"^coordinator: 'x' is not HOST:PORT$"):
        SessionConfig("w1", coordinator="a:1,x")


# ---------------------------------------------------------------- following


def test_endpoints_follow_and_rotate() -> None:
    ep = Endpoints("a:1,b:2,c:3")
    assert ep.current == "a:1"
    assert ep.rotate() == "b:2"
    assert ep.follow("c:3") and ep.current == "c:3"
    assert ep.rotate() == "a:1"
    # Hints that are not addresses are not dialled.
    assert not ep.follow("") and not ep.follow(None) and not ep.follow("garbage")
    assert ep.current == "a:1"


def test_unlisted_hint_is_not_followed_without_tls(caplog: pytest.LogCaptureFixture) -> None:
    ep = Endpoints("a:1,b:2")
    caplog.set_level(logging.WARNING, "plait.endpoints")
    assert not ep.follow("evil.example:7450")
    assert not ep.follow("evil.example:7450")
    assert ep.current == "a:1"
    assert ep.unlisted("evil.example:7450") is None  # nothing to check: refused outright
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "not following leader hint evil.example:7450: not in the --coordinator list (a:1,b:2)"
        " and without TLS it cannot be verified as a coordinator"
    ]  # once per address


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read: the verify function is replaced\n")
    return TlsFiles(str(ca))


def test_unlisted_hint_is_followed_once_its_certificate_verifies(tls: TlsFiles) -> None:
    checked: list[str] = []

    def verify(address: str, files: TlsFiles) -> str | None:
        checked.append(address)
        return None if address == "d:4" else "its certificate is not a coordinator's"

    ep = Endpoints("a:1,b:2,c:3", tls=tls, verify=verify)
    ep.rotate()
    # A listed leader needs no handshake.
    assert ep.follow("c:3") and checked == []
    ep.rotate()
    assert ep.unlisted("d:4") == "d:4" and ep.unlisted("a:1") is None
    assert ep.follow("d:4") and ep.current == "d:4"
    # From it, rotation goes back to the listed address that named it, then on.
    assert ep.rotate() == "a:1"
    assert ep.rotate() == "b:2"
    # A pass counts once: the next redirect there is checked again.
    assert ep.follow("d:4") and checked == ["d:4", "d:4"]
    ep.rotate()
    assert not ep.follow("e:5") and ep.current == "b:2"


def test_non_blocking_follow_uses_only_an_earlier_check(tls: TlsFiles) -> None:
    checked: list[str] = []

    def verify(address: str, files: TlsFiles) -> str | None:
        checked.append(address)
        return None

    ep = Endpoints("a:1", tls=tls, verify=verify)
    assert not ep.follow("d:4", blocking=False) and checked == []
    assert ep.check_hint("d:4") is None
    assert ep.follow("d:4", blocking=False) and ep.current == "d:4"


def test_not_leader_of_reads_the_hint() -> None:
    found = not_leader_of(refusal("b:2"))
    assert found is not None and found.leader == "b:2"
    unknown = not_leader_of(refusal(None))
    assert unknown is not None and unknown.leader is None
    assert not_leader_of(unreachable()) is None
    assert not_leader_of(ValueError("x")) is None


def quick() -> Backoff:
    return Backoff(timedelta(milliseconds=100), timedelta(seconds=1), rng=random.Random(1))


def test_failover_follows_a_named_leader_at_once() -> None:
    ep = Endpoints("s:1,l:2")
    walk = Failover(ep, backoff=quick())
    assert walk.next_delay("l:2", named=True) == 0.0
    assert ep.current == "l:2"


def test_failover_rotates_and_pauses_after_a_full_round() -> None:
    ep = Endpoints("a:1,b:2,c:3")
    walk = Failover(ep, max_hops=5, backoff=quick())
    delays = [walk.next_delay() for _ in range(6)]
    assert [d == 0.0 for d in delays[:2]] == [True, True]
    assert delays[2] is not None and delays[2] > 0  # a, b, c all tried: back off
    assert delays[3:5] == [0.0, 0.0]
    assert delays[5] is None  # the hop budget is spent
    assert walk.hops == 5


def test_failover_does_not_ping_pong_between_stale_hints() -> None:
    ep = Endpoints("a:1,b:2")
    walk = Failover(ep, backoff=quick())
    assert walk.next_delay("b:2", named=True) == 0.0
    # b names a, already tried in this call: rotate instead, and this round is over.
    delay = walk.next_delay("a:1", named=True)
    assert ep.current == "a:1"
    assert delay is not None and delay > 0


def test_failover_with_one_address() -> None:
    ep = Endpoints("a:1")
    # Unreachable and nothing else to try: fail at once, as a one-address client always did.
    assert Failover(ep, backoff=quick()).next_delay() is None
    # A standby with no leader yet: wait for the election, within the budget.
    walk = Failover(ep, max_hops=2, backoff=quick())
    assert walk.next_delay(None, named=True) is not None
    # A standby naming a listed leader: go there.
    ep = Endpoints("a:1,l:9")
    assert Failover(ep, backoff=quick()).next_delay("l:9", named=True) == 0.0
    assert ep.current == "l:9"
    # One naming a leader it was not given (and no TLS to verify it): stay, back off.
    ep = Endpoints("a:1")
    delay = Failover(ep, backoff=quick()).next_delay("l:9", named=True)
    assert ep.current == "a:1" and delay is not None and delay > 0


def test_failover_starts_afresh_after_progress() -> None:
    ep = Endpoints("a:1,b:2")
    walk = Failover(ep, max_hops=2, backoff=quick())
    walk.next_delay()
    walk.next_delay()
    walk.progressed()
    assert walk.next_delay() is not None


# ---------------------------------------------------------------- the worker's choice


def test_worker_links_follow_refusals_at_once_and_back_off_otherwise() -> None:
    links = CoordinatorLinks("s:1,l:2", quick())
    assert links.next_delay(refusal("l:2")) == 0.0
    assert links.address == "l:2"
    links.connected()
    # The leader went away: the next address, after a backoff delay.
    delay = links.next_delay(unreachable())
    assert links.address == "s:1" and 0.0 <= delay <= 0.1
    # A standby that knows no leader: rotate, back off.
    links.next_delay(refusal(None))
    assert links.address == "l:2"
    # Stale hints that keep naming a coordinator which refuses us: followed a few times in a
    # row, then the backoff applies.
    backoff = quick()
    links = CoordinatorLinks("s:1,t:2", backoff)
    delays = []
    for _ in range(4):
        other = "t:2" if links.address == "s:1" else "s:1"
        delays.append(links.next_delay(refusal(other)))
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert backoff.failures == 1


async def test_worker_links_check_an_unlisted_hint_off_the_event_loop(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []

    def verify(address: str, files: TlsFiles) -> str | None:
        threads.append(threading.current_thread())
        return None

    monkeypatch.setattr("plait.trust.verify_coordinator", verify)
    links = CoordinatorLinks("s:1", quick(), tls=tls)
    # Without the check first, the hint is not followed (and nothing blocks).
    assert links.next_delay(refusal("l:2")) > 0 and links.address == "s:1"
    await links.check_hint(refusal("l:2"))
    assert threads and threads[0] is not threading.main_thread()
    assert links.next_delay(refusal("l:2")) == 0.0 and links.address == "l:2"
    await asyncio.sleep(0)


# ---------------------------------------------------------------- the token rule


def test_client_refuses_a_token_in_plaintext_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PLAIT_TLS_CA", "PLAIT_TLS_CERT", "PLAIT_TLS_KEY", "PLAIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as info:
        Client("127.0.0.1:7450,10.0.0.2:7450", token="plait_secret")
    message = info.value.message
    assert "10.0.0.2:7450" in message and "without TLS" in message and "--tls-ca" in message
    monkeypatch.setenv("PLAIT_TOKEN", "plait_secret")
    with pytest.raises(ConfigError, match=r"coord\.example:7450"):
        Client("coord.example:7450")
    # Loopback, or no token at all, is fine.
    Client("127.0.0.1:7450,localhost:7451,[::1]:7452").close()
    monkeypatch.delenv("PLAIT_TOKEN")
    Client("coord.example:7450").close()


def test_worker_session_refuses_a_token_in_plaintext_beyond_loopback() -> None:
    with pytest.raises(ConfigError, match=r"coord\.example:7450"):
        SessionConfig("w1", coordinator="coord.example:7450", token="plait_secret")
    assert "plait_secret" not in repr(SessionConfig("w1", token="plait_secret"))
