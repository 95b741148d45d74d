"""Strategies and checks for the fuzz suite (tests/integration/test_fuzz.py).

The coordinator under test (:class:`Target`), the check every call goes through
(:func:`checked`: no UNKNOWN or INTERNAL, an INVALID_ARGUMENT names its field), and the
Hypothesis strategies that build valid messages with one field mutated.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from plait.errors import InvalidArgumentError, from_rpc_error
from plait.v1 import workflow_pb2 as pb
from tests.system.harness import Cluster

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# A bug, not a refusal: an exception escaped a handler (or the coordinator fell over).
BUG_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CONNECT = "/plait.v1.WorkerService/Connect"
MiB = 1 << 20
worker_ids = itertools.count()


# ---- the coordinator under test ------------------------------------------------------------


class Target:
    """The running coordinator, a channel to it, and what every example checks afterwards."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.channel = grpc.insecure_channel(
            cluster.grpc_target, options=[("grpc.max_send_message_length", 8 * MiB)]
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.known: list[str] = []  # accepted workflow ids

    def unary(self, method: str) -> Callable[..., Any]:
        return self.channel.unary_unary(method, request_serializer=raw, response_deserializer=raw)

    def assert_serving(self) -> None:
        daemon = self.cluster.daemon("coordinator")
        assert daemon.running(), f"the coordinator exited:\n{daemon.log_tail()}"
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def raw(b: bytes) -> bytes:
    return b


def checked(call: Callable[[], Any]) -> Any:
    """Runs one RPC: any status but UNKNOWN/INTERNAL; INVALID_ARGUMENT must name a field."""
    try:
        return call()
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        assert code not in BUG_CODES, f"{code}: {err.details()}"  # type: ignore[attr-defined]
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            back = from_rpc_error(err)
            assert isinstance(back, InvalidArgumentError) and back.violations, back
            assert all(v.description for v in back.violations), back.violations
        return None


# ---- strategies: mutated fields --------------------------------------------------------------

good_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
bad_ids = st.one_of(
    st.sampled_from(["", ".", "..", "../x", "a/b", "a\x00b", "\x1b]0;pwn\x07", "[b]x[/b]"]),
    st.text(max_size=30),
    st.text(min_size=129, max_size=200),
    st.integers(min_value=129, max_value=5000).map(lambda n: "x" * n),
)
ids = st.one_of(good_ids, good_ids, bad_ids)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
).map(json.dumps)
hostile_json = st.one_of(
    st.integers(min_value=65, max_value=100_000).map(nested),
    st.integers(min_value=65, max_value=2000).map(lambda n: '["]",' * n + "1" + "]" * n),
    st.integers(min_value=65, max_value=100_000).map(lambda n: "[" * n),  # unterminated
    st.text(max_size=40),  # mostly not JSON
    st.integers(min_value=MiB, max_value=MiB + 4096).map(lambda n: '"' + "x" * n + '"'),
)
json_texts = st.one_of(st.just(""), small_json, small_json, hostile_json)
int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
int32 = st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)
uint32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
uint64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
# (seconds, nanos): mostly valid (often under a few seconds, so timers fire during the run),
# some at the far edge of the range, some anything the wire allows.
durations = st.one_of(
    st.tuples(st.integers(min_value=0, max_value=3), st.integers(0, 10**9 - 1)),
    st.tuples(st.integers(min_value=0, max_value=100), st.integers(0, 10**9 - 1)),
    st.tuples(
        st.sampled_from(
            [315_576_000_000, 315_576_000_001, 1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1]
        ),
        st.sampled_from([0, 999_999_999, 10**9, -1]),
    ),
    st.tuples(int64, int32),
)
amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=64)
)
texts = st.one_of(
    st.text(max_size=30), st.integers(min_value=1000, max_value=70_000).map(lambda n: "é" * n)
)


def fuzz_action(action_id: str = "a") -> pb.ActionSpec:
    """A valid action nobody serves except the fuzz workers."""
    return pb.ActionSpec(id=action_id, handler="fuzz")


def set_duration(msg: Any, value: tuple[int, int]) -> None:
    msg.seconds, msg.nanos = value


MUTATIONS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("id", ids),
    ("handler", ids),
    ("input_json", json_texts),
    ("argv", st.lists(texts, max_size=5) | st.integers(1, 6000).map(lambda n: ["x"] * n)),
    ("env", st.dictionaries(texts, texts, max_size=4)),
    ("selector", st.dictionaries(texts, texts, max_size=4)),
    ("resources", st.dictionaries(ids, amounts, max_size=3)),
    ("semaphores", st.lists(st.tuples(ids, uint32, uint32), max_size=3)),
    ("timeout", durations),
    ("queue_timeout", durations),
    ("heartbeat_timeout", durations),
    ("speculate", durations),
    ("retry", st.tuples(uint32, st.floats(allow_nan=True), durations, durations, st.floats())),
    ("join", st.tuples(int32, uint32, st.floats(allow_nan=True))),
    ("map", st.tuples(texts, uint32)),
    ("priority", int32),
    ("slots", uint32),
    ("no_kind", st.just(True)),
    ("needs", st.lists(ids, max_size=3)),
]


def mutate(a: pb.ActionSpec, name: str, value: Any) -> None:
    if name in ("id", "handler", "input_json", "priority", "slots"):
        setattr(a, name, value)
    elif name == "argv":
        a.exec.argv.extend(value)
    elif name in ("env", "selector", "resources"):
        getattr(a, name).update(value)
    elif name == "semaphores":
        for n, permits, capacity in value:
            a.semaphores.add(name=n, permits=permits, capacity=capacity)
    elif name in ("timeout", "queue_timeout", "heartbeat_timeout"):
        set_duration(getattr(a, name), value)
    elif name == "speculate":
        set_duration(a.speculate.after, value)
    elif name == "retry":
        attempts, mult, initial, most, jitter = value
        a.retry.max_attempts = attempts
        a.retry.backoff_multiplier = mult
        set_duration(a.retry.initial_backoff, initial)
        set_duration(a.retry.max_backoff, most)
        a.retry.jitter = jitter
    elif name == "join":
        a.join.kind, a.join.at_least_count, a.join.at_least_fraction = value
    elif name == "map":
        a.map.over, a.map.max_items = value
    elif name == "no_kind":
        a.ClearField("kind")
    elif name == "needs":
        a.needs.extend(value)


MUTATED = dict(MUTATIONS)


@st.composite
def specs(draw: st.DrawFn, field: str = "") -> pb.WorkflowSpec:
    """A valid workflow of 1 to 3 actions, then: ``field`` of one action mutated (when
    given), the others with at most one mutated field, the workflow itself with one mutated
    field in two cases out of five."""
    n = draw(st.integers(min_value=1, max_value=3))
    actions = [fuzz_action(f"a{i}") for i in range(n)]
    if n > 1 and draw(st.booleans()):
        actions[1].needs.append("a0")
    for i, a in enumerate(actions):
        if field and i == 0:
            mutate(a, field, draw(MUTATED[field]))
        elif draw(st.booleans()):
            name, strategy = draw(st.sampled_from(MUTATIONS))
            mutate(a, name, draw(strategy))
    spec = pb.WorkflowSpec(name=f"fuzz-{n}", actions=actions)
    spec.fail_fast = draw(st.booleans())
    which = draw(
        st.sampled_from(["", "", "", "name", "labels", "deadline", "defaults", "priority"])
    )
    if which == "name":
        spec.name = draw(st.one_of(good_ids, texts))
    elif which == "labels":
        spec.labels.update(draw(st.dictionaries(st.one_of(good_ids, texts), texts, max_size=4)))
    elif which == "deadline":
        set_duration(spec.deadline, draw(durations))
    elif which == "defaults":
        set_duration(spec.defaults.timeout, draw(durations))
    elif which == "priority":
        spec.priority = draw(int32)
    return spec
