"""One place for each concept the review found scattered (issue 9).

Each concept has one function or one constant, and these tests fail when it is written a second
time or when one side stops using it: semaphore capacity/permit defaults, the journal's page
size, the store-URL dispatch, the output rule and its limit, the id rule, the removed
``Lease`` fields, and the core's independence from the edge.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hst

import plait.coordinator
from plait import jsonlimits
from plait.coordinator import config as coordinator_config
from plait.coordinator.config import CoordinatorConfig, Limits
from plait.coordinator.core import input_limits, views
from plait.coordinator.core.state import CoreConfig
from plait.coordinator.journal import store as journal_store
from plait.coordinator.journal.leadership import open_leadership
from plait.coordinator.journal.postgres import PostgresJournal
from plait.coordinator.journal.sqlite import SqliteJournal
from plait.coordinator.journal.store import PAGE_SIZE, JournalStore, open_store, parse_store_url
from plait.errors import ConfigError
from plait.hlc import ZERO
from plait.ids import describe_id
from plait.spec.rules import semaphore_terms
from plait.v1 import worker_service_pb2 as wpb
from plait.v1 import workflow_pb2 as pb
from plait.worker import executor
from plait.worker.handlers import ActionContext, outputs_result
from plait.worker.serve import default_worker_id
from plait.worker.session_config import SessionConfig
from tests.unit.core_driver import Driver, independent
from tests.unit.test_limits import hello

COORDINATOR = Path(plait.coordinator.__file__).parent
CLIENT = Path(plait.__file__).parent
MiB = 1024 * 1024


def _sources(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.py"))}


# 1. Semaphore capacity and permits ------------------------------------------------------------


def test_the_semaphore_defaults_are_written_once() -> None:
    # Written once, in the foundation both the coordinator and `plait validate` read.
    hits = [
        name
        for root in (COORDINATOR, CLIENT)
        for name, text in _sources(root).items()
        if re.search(r"\.(capacity|permits) or 1", text)
    ]
    assert hits == ["spec/rules.py"], hits
    assert semaphore_terms(pb.SemaphoreRequest(name="x")) == (1, 1)
    assert semaphore_terms(pb.SemaphoreRequest(name="x", capacity=3, permits=2)) == (3, 2)


def test_why_waiting_agrees_with_dispatch_on_the_smallest_capacity() -> None:
    """Actions that disagree on a capacity get the smallest; "why is it waiting" must use the
    same arithmetic as dispatch (it read the recorded capacity alone, and said "a free slot")."""
    d = Driver()
    s = independent(2)
    s.actions[0].semaphores.add(name="db", capacity=3)
    s.actions[1].semaphores.add(name="db", capacity=1)
    d.submit(s)
    leased = hello(d, "s1", "w1", slots=8)
    assert [lease.action_id for lease in leased] == ["a0"]  # a1 declares capacity 1: full
    status = views.workflow_status(d.st, d.st.workflows["wf-1"])
    reason = {a.action_id: a.reason for a in status.actions}["a1"]
    assert reason == "waiting for semaphore 'db' (1 of 1 permits held)"


# 2. The journal's page size -------------------------------------------------------------------


@pytest.mark.parametrize("store", [JournalStore, SqliteJournal, PostgresJournal])
def test_every_backend_pages_by_the_one_page_size(store: type) -> None:
    assert inspect.signature(store.read).parameters["limit"].default == PAGE_SIZE
    assert inspect.signature(store.replay).parameters["batch"].default == PAGE_SIZE
    source = inspect.getsource(inspect.getmodule(store))  # type: ignore[arg-type]
    assert not re.search(r"(limit|batch): int = \d", source), "a page size written again"


# 3. Store URLs --------------------------------------------------------------------------------


def test_store_urls_are_read_in_one_place(tmp_path: Path) -> None:
    assert parse_store_url("sqlite:///plait.db") == ("sqlite", "plait.db")
    assert parse_store_url("sqlite:////abs/p.db") == ("sqlite", "/abs/p.db")
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert parse_store_url(url) == ("postgresql", url)
    for bad in ("mysql://h/db", "sqlite://rel.db", "sqlite:///", "plait.db"):
        with pytest.raises(ValueError, match="expected sqlite:///PATH or postgresql://") as err:
            parse_store_url(bad)
        # The config, the store and the leadership refuse it with the same words.
        with pytest.raises(ConfigError) as cfg_err:
            CoordinatorConfig(store=bad).validate()
        assert str(cfg_err.value) == str(err.value)
        with pytest.raises(ValueError) as store_err:
            open_store(bad)
        assert str(store_err.value) == str(err.value)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/j.db"), SqliteJournal)
    lead = open_leadership(
        f"sqlite:///{tmp_path}/j.db", holder="h", advertise="a:1", ttl=timedelta(seconds=30)
    )
    assert type(lead).__name__ == "FileLockLeadership"
    schemes = [
        name
        for name, text in _sources(COORDINATOR).items()
        if re.search(r"(startswith|removeprefix)\(.*(sqlite|postgres|_SQLITE|_POSTGRES)", text)
    ]
    assert schemes == ["journal/store.py"], schemes


# 4. Outputs: one rule, one default, the configured limit honoured ----------------------------


def test_the_output_limit_has_one_default() -> None:
    assert (
        jsonlimits.MAX_OUTPUT_BYTES
        == executor.MAX_OUTPUT_BYTES
        == Limits().max_output_bytes
        == CoreConfig().max_output_bytes
        == coordinator_config.MAX_OUTPUT_CEILING
        == MiB
    )
    hits = [n for n, t in _sources(COORDINATOR).items() if re.search(r"1024 \* 1024\b(?! -)", t)]
    assert "core/results.py" not in hits


def _finish_with(config: CoreConfig, outputs: str) -> tuple[str, str]:
    d = Driver(config)
    s = independent(1)
    s.actions[0].retry.max_attempts = 1
    d.submit(s)
    (lease,) = hello(d, "s1", "w1")
    d.finish("s1", lease, outputs=outputs)
    a = d.st.workflows["wf-1"].actions["a0"]
    return d.state("a0"), a.reason


def test_the_core_honours_the_configured_output_limits() -> None:
    big = json.dumps({"x": "y" * 200})
    assert _finish_with(CoreConfig(), big)[0] == "ACTION_STATE_SUCCEEDED"
    state, reason = _finish_with(CoreConfig(max_output_bytes=100), big)
    assert state == "ACTION_STATE_FAILED"
    assert "the limit max_output_bytes is 100" in reason, reason
    # A configured depth above the default is honoured too (the core used its own 64).
    deep = '{"x": ' + "[" * 80 + "]" * 80 + "}"
    assert _finish_with(CoreConfig(), deep)[0] == "ACTION_STATE_FAILED"
    assert _finish_with(CoreConfig(max_json_depth=100), deep)[0] == "ACTION_STATE_SUCCEEDED"


def test_the_runtime_gives_the_core_every_configured_limit(tmp_path: Path) -> None:
    from plait.clock import SystemClock
    from plait.coordinator.metrics import CoordinatorMetrics
    from plait.coordinator.runtime import Runtime
    from plait.coordinator.tracing import Tracing

    limits = replace(Limits(), max_output_bytes=1000, max_json_depth=99, max_lease_bytes=5000)
    cfg = CoordinatorConfig(limits=limits)
    store = open_store(f"sqlite:///{tmp_path / 'unused.db'}")  # never opened: no core loaded
    runtime = Runtime(cfg, store, SystemClock(), CoordinatorMetrics(), Tracing())
    core = runtime._new_core(ZERO)
    shared = {f.name for f in fields(CoreConfig)} & {f.name for f in fields(Limits)}
    assert shared >= {"max_output_bytes", "max_json_depth", "max_lease_bytes"}
    for name in shared:
        assert getattr(core.config, name) == getattr(limits, name), name


def test_the_sdk_refuses_outputs_by_the_coordinators_rule() -> None:
    ctx = ActionContext()
    assert outputs_result({"a": 1}, ctx).outputs_json == '{"a":1}'
    too_big = outputs_result({"x": "y" * MiB}, ctx)
    assert (
        too_big.error
        == f"handler outputs_json is {MiB + 8} bytes; the limit max_output_bytes is {MiB}"
    )
    assert too_big.error_code == executor.Code.RESOURCE_EXHAUSTED
    # Deeper than the coordinator accepts: refused by the worker, not failed after the fact.
    deep: object = {}
    for _ in range(80):
        deep = [deep]
    refused = outputs_result({"x": deep}, ctx)
    assert refused.outcome == executor.FAILED
    assert "the limit max_json_depth is 64" in refused.error
    assert refused.error_code == executor.Code.INVALID_ARGUMENT


# 5. The id rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", ["-w", ".w", "_w", "a..b", "", "x" * 129, "a b"])
def test_the_sdk_refuses_at_once_an_id_the_coordinator_refuses(worker_id: str) -> None:
    why = describe_id(worker_id)
    assert why is not None
    with pytest.raises(ValueError) as err:
        SessionConfig(worker_id=worker_id)
    assert str(err.value) == f"worker_id {worker_id!r}: {why}"


@given(hst.text(alphabet="ab1-_. ", max_size=6))
def test_the_sdk_accepts_exactly_the_ids_the_coordinator_accepts(worker_id: str) -> None:
    try:
        SessionConfig(worker_id=worker_id)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == (describe_id(worker_id) is None)


@pytest.mark.parametrize("host", ["-weird", "_x.example.com", "ok-host", "", "..", "a b"])
def test_the_default_worker_id_always_fits_the_rule(host: str) -> None:
    assert describe_id(default_worker_id(host)) is None


def test_workerd_checks_its_id_by_the_same_rule() -> None:
    from plait.workerd.config import WorkerdConfig

    with pytest.raises(ConfigError, match=r"--id: 'a\.\.b'"):
        WorkerdConfig(worker_id="a..b").validate()


# 6. Lease fields nobody set -------------------------------------------------------------------


def test_lease_state_and_status_are_gone_and_reserved() -> None:
    lease = wpb.Lease.DESCRIPTOR
    assert "state" not in lease.fields_by_name and "status" not in lease.fields_by_name
    assert not hasattr(wpb, "LeaseState")
    proto = (Path(__file__).parents[2] / "proto/plait/v1/worker_service.proto").read_text()
    assert "reserved 2, 12;" in proto and 'reserved "state", "status";' in proto


# 7. The core imports nothing from the edge ----------------------------------------------------


def test_the_core_imports_nothing_from_the_edge() -> None:
    edge = []
    for name, text in _sources(COORDINATOR / "core").items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                if mod.startswith("plait.coordinator.") and not mod.startswith(
                    "plait.coordinator.core"
                ):
                    edge.append((name, mod))
    assert edge == []
    # config's public names still work, and are the core's.
    assert coordinator_config.Limits is input_limits.Limits
    assert coordinator_config.MAX_MESSAGE_BYTES == input_limits.MAX_MESSAGE_BYTES
    assert journal_store.PAGE_SIZE == PAGE_SIZE
