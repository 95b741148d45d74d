"""Plait across three "hosts": network namespaces joined by veth pairs, mTLS on every link.

The coordinator runs in namespace ``c`` listening on ``0.0.0.0:7450`` — beyond loopback, so it
must have TLS and client authentication (``--tls-client-ca``: every caller presents a certificate
from the test CA). Workers ``w1`` and ``w2`` run in their own namespaces and reach it only over
their own link (``10.231.1.1`` and ``10.231.2.1``, both named in the coordinator's certificate),
each with its own worker certificate. The ``plait`` client runs inside ``c`` with the ``admin``
certificate. The PKI is made with ``plait certs``, as an operator would.

* a fan-out/join workflow runs its branches on both hosts (each action records the network
  namespace it ran in, which must be its worker's);
* a worker whose link is cut for longer than the lease TTL while its action runs: the action
  runs again on the other host and commits there, the partitioned worker kills its own attempt
  (self-fencing) and, once the link is back, its late result is refused (STALE_RESULT_REFUSED);
  the journal holds exactly one committed outcome.

Namespaces need root and iproute2: skipped without them, failed under CI (``tests.system.netns``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from plait.v1 import workflow_pb2 as wf
from tests import procs
from tests.system import invariants, journal_check, netns
from tests.system.harness import (
    ROOT,
    TEST_PROFILE,
    Cluster,
    Daemon,
    HarnessError,
    daemon_env,
    describe,
    wait_for,
)

pytestmark = [pytest.mark.system]

PORT = 7450  # the namespaces are fresh: the documented port is free in them
CLI_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 60.0
LEASE_TTL_S = 2.0
CUT_FOR_S = 4.0  # > lease TTL: long enough for the lease to expire and the attempt to self-fence


# ----- support ---------------------------------------------------------------------------------


def _need_daemons() -> None:
    for module in ("plait.coordinator.__main__", "plait.workerd.__main__", "plait.certs"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} does not exist yet")


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    """Namespaces c, w1, w2 (skipped without root/iproute2; failed under CI)."""
    netns.require()
    with netns.hosts(("w1", "w2")) as h:
        yield h


def plait_cli(*argv: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``plait ARGV`` in the root namespace (only for offline commands: ``certs``)."""
    return subprocess.run(
        [sys.executable, "-m", "plait.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, coordinator (both link addresses), admin and worker certificates, via `plait certs`."""
    netns.require()  # first: module-scoped fixtures run before `hosts`
    _need_daemons()
    pki = tmp_path_factory.mktemp("pki")
    hosts = netns.Hosts(("w1", "w2"))  # addresses only; nothing is created
    steps = [
        ["certs", "init", "--dir", str(pki)]
        + [arg for ip in hosts.coordinator_ips for arg in ("--coordinator-host", ip)],
        ["certs", "worker", "w1", "w2", "--dir", str(pki)],
    ]
    for step in steps:
        done = plait_cli(*step)
        assert done.returncode == 0, f"plait {' '.join(step)}: {done.returncode}\n{done.stderr}"
    for name in ("ca.crt", "coordinator.crt", "coordinator.key", "admin.crt", "admin.key"):
        assert (pki / name).is_file(), f"plait certs init wrote no {name}"
    for worker in ("w1", "w2"):
        assert (pki / f"worker-{worker}.crt").is_file()
    return pki


def parse_events(stdout: str) -> list[wf.HistoryEvent]:
    return [
        json_format.ParseDict(json.loads(line), wf.HistoryEvent(), ignore_unknown_fields=True)
        for line in stdout.splitlines()
        if line.strip()
    ]


@dataclass
class Fleet(Cluster):
    """A coordinator in namespace ``c`` and workerds in ``w1``/``w2``, all on mTLS.

    Reuses :class:`Cluster` for process bookkeeping, teardown and its leak check (and so the
    failure report shows every daemon's log). The test process sits outside the namespaces, so
    it talks to the coordinator only through ``plait`` commands run inside ``c``; Cluster's gRPC
    helpers are not usable here.
    """

    hosts: netns.Hosts | None = None
    pki: Path | None = None

    @property
    def net(self) -> netns.Hosts:
        assert self.hosts is not None
        return self.hosts

    @property
    def tls(self) -> Path:
        assert self.pki is not None
        return self.pki

    @property
    def channel(self) -> Any:
        raise HarnessError("the coordinator is in another network namespace: use fleet.plait()")

    @property
    def db(self) -> Path:
        return self.tmp / "plait.db"

    def start_coordinator(self, **overrides: str | None) -> Any:
        argv = [
            sys.executable, "-m", "plait.coordinator",
            "--listen", f"0.0.0.0:{PORT}",
            "--store", f"sqlite:///{self.db}",
            "--metrics-listen", "off",
            "--tls-cert", str(self.tls / "coordinator.crt"),
            "--tls-key", str(self.tls / "coordinator.key"),
            "--tls-client-ca", str(self.tls / "ca.crt"),
            *[x for flag_value in TEST_PROFILE.items() for x in flag_value],
            "--ready-file", str(self.ready_file),
        ]  # fmt: skip
        self.ready_file.unlink(missing_ok=True)
        daemon = Daemon(
            "coordinator", self.net.wrap("c", argv), daemon_env(), self.tmp / "coordinator.log"
        )
        self.daemons["coordinator"] = daemon
        daemon.start()
        self._start_watcher()

        def ready() -> dict[str, Any] | None:
            if not daemon.running():
                raise HarnessError(
                    f"coordinator exited with {daemon.popen and daemon.popen.returncode}"
                    f" before it was ready:\n{daemon.log_tail()}"
                )
            try:
                return dict(json.loads(self.ready_file.read_text()))
            except (OSError, ValueError):
                return None

        data = wait_for("the coordinator's ready file", ready, STEP_TIMEOUT_S, interval=0.1)
        # `ip netns exec` execs the program: the pid we started is the coordinator's own.
        assert int(data["pid"]) == daemon.pid, (data, daemon.pid)
        return data

    def add_worker(self, name: str, **_: Any) -> Daemon:  # type: ignore[override]
        argv = [
            sys.executable, "-m", "plait.workerd",
            "--coordinator", f"{self.net.coordinator_ip(name)}:{PORT}",
            "--id", name,
            "--slots", "2",
            "--label", f"host={name}",
            "--no-adaptive",  # a loaded CI machine must not make a worker withhold its slots
            "--allow-root",  # the tests run as root
            "--reconnect-backoff", "50ms:1s",
            "--tls-ca", str(self.tls / "ca.crt"),
            "--tls-cert", str(self.tls / f"worker-{name}.crt"),
            "--tls-key", str(self.tls / f"worker-{name}.key"),
        ]  # fmt: skip
        daemon = Daemon(name, self.net.wrap(name, argv), daemon_env(), self.tmp / f"{name}.log")
        self.daemons[name] = daemon
        daemon.start()
        return daemon

    # ----- the client, inside c -----------------------------------------------------------

    def plait(self, *argv: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """``plait ARGV`` inside ``c``: admin certificate (PLAIT_TLS_*), dialling the address
        the coordinator has on w1's link (one of its certificate's names)."""
        env = daemon_env(
            {
                "PLAIT_COORDINATOR": f"{self.net.coordinator_ip('w1')}:{PORT}",
                "PLAIT_TLS_CA": str(self.tls / "ca.crt"),
                "PLAIT_TLS_CERT": str(self.tls / "admin.crt"),
                "PLAIT_TLS_KEY": str(self.tls / "admin.key"),
            }
        )
        return self.net.run(
            "c", [sys.executable, "-m", "plait.cli.main", *argv], timeout=timeout, env=env, cwd=ROOT
        )

    def plait_ok(self, *argv: str) -> str:
        done = self.plait(*argv)
        if done.returncode != 0:
            raise HarnessError(
                f"plait {' '.join(argv)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
            )
        return done.stdout

    def workers_listed(self) -> set[str]:
        done = self.plait("workers", "-o", "json")
        if done.returncode != 0:
            return set()
        return {w["worker_id"] for w in json.loads(done.stdout).get("workers", [])}

    def wait_workers(self, names: Any, timeout: float = STEP_TIMEOUT_S) -> None:
        wanted = set(names)

        def probe() -> bool:
            for name in wanted:
                daemon = self.daemons[name]
                if not daemon.running():
                    raise HarnessError(f"{name} exited early:\n{daemon.log_tail()}")
            return wanted <= self.workers_listed()

        wait_for(f"workers {sorted(wanted)} to connect over mTLS", probe, timeout, interval=0.3)

    def submit_file(self, path: Path) -> str:
        reply = json.loads(self.plait_ok("submit", str(path), "-o", "json"))
        return str(reply["workflow_id"])

    def get(self, workflow_id: str) -> wf.WorkflowStatus:
        raw = json.loads(self.plait_ok("status", workflow_id, "-o", "json"))
        return json_format.ParseDict(raw, wf.WorkflowStatus(), ignore_unknown_fields=True)

    def history(self, workflow_id: str) -> list[wf.HistoryEvent]:
        return parse_events(self.plait_ok("events", workflow_id, "-o", "json"))

    def wait_workflow(self, workflow_id: str, timeout: float = STEP_TIMEOUT_S) -> Any:
        terminal = {
            wf.WORKFLOW_STATE_SUCCEEDED,
            wf.WORKFLOW_STATE_PARTIALLY_SUCCEEDED,
            wf.WORKFLOW_STATE_FAILED,
            wf.WORKFLOW_STATE_CANCELLED,
        }

        def probe() -> wf.WorkflowStatus | None:
            status = self.get(workflow_id)
            return status if status.state in terminal else None

        try:
            return wait_for(f"workflow {workflow_id} to finish", probe, timeout, interval=0.3)
        except HarnessError as err:
            raise HarnessError(f"{err}; {describe(self.get(workflow_id))}") from None

    def wait_event(
        self, workflow_id: str, predicate: Any, what: str, timeout: float = STEP_TIMEOUT_S
    ) -> wf.HistoryEvent:
        def probe() -> wf.HistoryEvent | None:
            return next((e for e in self.history(workflow_id) if predicate(e)), None)

        return wait_for(what, probe, timeout, interval=0.3)


@pytest.fixture
def fleet(tmp_path: Path, hosts: netns.Hosts, pki: Path) -> Iterator[Fleet]:
    """Coordinator in c, workerds in w1 and w2, both connected; stopped (and leak-checked)."""
    f = Fleet(tmp_path / "fleet", hosts=hosts, pki=pki)
    f.tmp.mkdir()
    try:
        f.start_coordinator()
        f.add_worker("w1")
        f.add_worker("w2")
        f.wait_workers(["w1", "w2"])
        yield f
    finally:
        f.close()


# Every action runs this: it records where it ran (its network namespace, pid, fencing token),
# sleeps (the first attempt of an action `first_s`, later ones `later_s`) and reports the same.
ACTION = r"""
import json, os, sys, time
inputs = json.load(open(os.environ["PLAIT_INPUTS_FILE"]))
cfg = inputs.get("input") or {}
marks, action = cfg["marks"], os.environ["PLAIT_ACTION_ID"]
token = os.environ["PLAIT_FENCING_TOKEN"]
ns = int(os.readlink("/proc/self/ns/net").split("[")[1].rstrip("]"))
try:
    os.close(os.open(os.path.join(marks, f"first-{action}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    first = True
except FileExistsError:
    first = False
record = {"action": action, "token": token, "ns": ns, "pid": os.getpid(), "first": first}
tmp = os.path.join(marks, f".{action}-{token}-{os.getpid()}")
with open(tmp, "w") as f:
    json.dump(record, f)
os.rename(tmp, os.path.join(marks, f"{action}-{token}-{os.getpid()}.json"))
time.sleep(float(cfg.get("first_s" if first else "later_s", 0)))
needs = {k: v.get("outputs", {}).get("ns") for k, v in (inputs.get("needs") or {}).items()}
with open(os.environ["PLAIT_OUTPUT"], "w") as f:
    json.dump({"ns": ns, "token": token, "needs_ns": needs}, f)
"""


def write_flow(tmp: Path, name: str, actions: list[dict[str, Any]]) -> tuple[Path, Path]:
    """A workflow file (JSON is YAML) whose actions run :data:`ACTION`; returns (file, marks)."""
    marks = tmp / f"marks-{name}"
    marks.mkdir()
    script = tmp / "action.py"
    script.write_text(ACTION)
    for action in actions:
        action["run"] = [sys.executable, str(script)]
        action["input"] = {"marks": str(marks), **action.get("input", {})}
    flow = tmp / f"{name}.yaml"
    flow.write_text(json.dumps({"name": name, "defaults": {"timeout": "2m"}, "actions": actions}))
    return flow, marks


def runs(marks: Path, action: str | None = None) -> list[dict[str, Any]]:
    """Every recorded execution (of one action), in start order."""
    out = [json.loads(p.read_text()) for p in marks.glob("*.json")]
    out = [r for r in out if action is None or r["action"] == action]
    return sorted(out, key=lambda r: (r["action"], int(r["token"]), r["pid"]))


def submitted_spec(events: list[wf.HistoryEvent]) -> wf.WorkflowSpec:
    (submitted,) = invariants.of_type(events, wf.EVENT_TYPE_WORKFLOW_SUBMITTED)
    return submitted.spec


# ----- the namespaces themselves (no Plait) ---------------------------------------------------

ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
open(sys.argv[2], "w").close()
while True:
    conn, peer = s.accept()
    with conn:
        data = conn.recv(1024)
        conn.sendall(peer[0].encode() + b" " + data)
"""

ECHO_CLIENT = r"""
import errno, json, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"hello")
        print(json.dumps({"reply": s.recv(1024).decode()}))
except OSError as e:
    print(json.dumps({"error": errno.errorcode.get(e.errno, str(e))}))
"""


def echo(h: netns.Hosts, host: str, address: str) -> dict[str, str]:
    done = h.run(host, [sys.executable, "-c", ECHO_CLIENT, address, str(PORT)], timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.timeout(120)
def test_namespaces_link_each_worker_to_the_coordinator_only(tmp_path: Path) -> None:
    netns.require()
    with netns.hosts(("w1", "w2")) as h:
        for host, ns in h.namespaces.items():
            assert ns.startswith(f"plait-{host}-") and len(ns) <= 15
            assert os.path.exists(f"/run/netns/{ns}")
        listening = tmp_path / "listening"
        server = h.popen("c", [sys.executable, "-c", ECHO_SERVER, str(PORT), str(listening)])
        try:
            wait_for("the echo server", listening.exists, 30)
            # Each worker reaches the coordinator on its own link, from its own address.
            assert echo(h, "w1", "10.231.1.1") == {"reply": "10.231.1.2 hello"}
            assert echo(h, "w2", "10.231.2.1") == {"reply": "10.231.2.2 hello"}
            # ...and nothing else: no route to the other link (no forwarding, no default route).
            assert echo(h, "w1", "10.231.2.1") == {"error": "ENETUNREACH"}
            assert echo(h, "w2", "10.231.1.1") == {"error": "ENETUNREACH"}

            h.cut("w1")
            assert not h.link_up("w1")
            assert echo(h, "w1", "10.231.1.1") == {"error": "ENETUNREACH"}
            assert echo(h, "w2", "10.231.2.1") == {"reply": "10.231.2.2 hello"}
            h.restore("w1")
            wait_for("w1's link to come back", lambda: h.link_up("w1"), 30)
            assert echo(h, "w1", "10.231.1.1") == {"reply": "10.231.1.2 hello"}
            # The server runs inside c: its network namespace is c's.
            assert [p.pid for p in h.processes()] == [server.pid]
        finally:
            server.kill()
            server.wait(10)
            procs.MANAGED.discard(server.pid)
        names = list(h.namespaces.values())
    for ns in names:
        assert not os.path.exists(f"/run/netns/{ns}"), f"{ns} was not deleted"


@pytest.mark.timeout(120)
def test_teardown_kills_what_a_test_left_inside(tmp_path: Path) -> None:
    netns.require()
    h = netns.Hosts(("w1",)).setup()
    try:
        # A grandchild in its own session, as a leaked action would be.
        left = h.run(
            "w1",
            [sys.executable, "-c", "import subprocess as s; print(s.Popen(['sleep', '300'],"
             " start_new_session=True, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"],
        )  # fmt: skip
        assert left.returncode == 0, left.stderr
        pid = int(left.stdout)
        assert procs.is_alive(pid)
    except BaseException:
        h.close(check=False)
        raise
    with pytest.raises(netns.NetnsError, match="still ran inside"):
        h.close()
    wait_for(f"pid {pid} to be killed", lambda: not procs.is_alive(pid), 10)
    assert not any(os.path.exists(f"/run/netns/{ns}") for ns in h.namespaces.values())


# ----- Plait across the hosts -----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fan_out_join_runs_on_both_hosts_over_mtls(fleet: Fleet) -> None:
    branches: list[dict[str, Any]] = [
        # One branch pinned to each host, so both must take part whatever the scheduler does.
        {"id": "left", "needs": ["split"], "selector": {"host": "w1"}},
        {"id": "right", "needs": ["split"], "selector": {"host": "w2"}},
        *({"id": f"mid-{i}", "needs": ["split"], "input": {"first_s": 0.5}} for i in range(4)),
    ]
    flow, marks = write_flow(
        fleet.tmp,
        "fanout",
        [
            {"id": "split"},
            *branches,
            {"id": "join", "needs": [b["id"] for b in branches]},
        ],
    )
    workflow_id = fleet.submit_file(flow)
    status = fleet.wait_workflow(workflow_id, timeout=120)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)

    events = fleet.history(workflow_id)
    spec = submitted_spec(events)
    invariants.check_history(events, spec)
    finished = {e.action_id: e for e in invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED)}
    assert set(finished) == {a.id for a in spec.actions}
    assert finished["left"].worker_id == "w1"
    assert finished["right"].worker_id == "w2"
    assert {e.worker_id for e in finished.values()} == {"w1", "w2"}

    # Each committed attempt ran in its worker's namespace (not merely under its name).
    inode = {w: fleet.net.netns_inode(w) for w in ("w1", "w2")}
    by_token = {(r["action"], int(r["token"])): r for r in runs(marks)}
    for action_id, e in finished.items():
        ran = by_token[(action_id, e.fencing_token)]
        assert ran["ns"] == inode[e.worker_id], (action_id, e.worker_id, ran)
        assert json.loads(e.outputs_json)["ns"] == inode[e.worker_id]
    joined = json.loads(finished["join"].outputs_json)["needs_ns"]
    assert set(joined.values()) == set(inode.values()), joined

    fleet.close()
    summary = journal_check.check_sqlite_journal(fleet.db)
    assert summary.finished_workflows == 1
    assert len(summary.committed) == len(spec.actions)


@pytest.mark.timeout(300)
def test_partitioned_worker_is_fenced_and_its_late_report_commits_nothing(fleet: Fleet) -> None:
    flow, marks = write_flow(
        fleet.tmp, "partition", [{"id": "long", "input": {"first_s": 6, "later_s": 1}}]
    )
    workflow_id = fleet.submit_file(flow)

    first = wait_for(
        "the first attempt to start",
        lambda: next((r for r in runs(marks, "long") if r["first"]), None),
        STEP_TIMEOUT_S,
    )
    holder = fleet.net.host_of_inode(first["ns"])
    assert holder in ("w1", "w2"), first
    other = {"w1": "w2", "w2": "w1"}[holder]
    assert procs.is_alive(first["pid"]), "the first attempt ended before its link was cut"

    fleet.net.cut(holder)
    cut_at = time.monotonic()
    try:
        # The lease expires (TTL 2 s without heartbeats) and the action moves to the other host.
        fleet.wait_event(
            workflow_id,
            lambda e: e.type == wf.EVENT_TYPE_ACTION_LEASED and e.worker_id == other,
            f"the action to be leased to {other} while {holder} is cut off",
        )
        # The cut-off worker stops its own attempt before the lease could be re-granted.
        wait_for(
            f"{holder} to self-fence its attempt (pid {first['pid']})",
            lambda: not procs.is_alive(first["pid"]),
            STEP_TIMEOUT_S,
        )
        assert not fleet.net.link_up(holder)
        # Keep the partition for CUT_FOR_S in all: a partition, not a blip.
        time.sleep(max(0.0, cut_at + CUT_FOR_S - time.monotonic()))
    finally:
        fleet.net.restore(holder)
    wait_for(f"{holder}'s link to come back", lambda: fleet.net.link_up(holder), 30)

    status = fleet.wait_workflow(workflow_id, timeout=120)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    # Back on the network, the partitioned worker reconnects over mTLS. Its attempt was fenced
    # (a CANCELLED report, acked and journalled nowhere), and Welcome.kill names the superseded
    # lease, so it sends nothing that could be refused; any late report that still arrives is
    # refused by fencing and never commits.
    fleet.wait_workers([holder, other])

    events = fleet.history(workflow_id)
    invariants.check_history(events, submitted_spec(events))
    leases = invariants.of_type(events, wf.EVENT_TYPE_ACTION_LEASED, "long")
    assert [e.worker_id for e in leases] == [holder, other], list(map(invariants.show, leases))
    for refused in invariants.of_type(events, wf.EVENT_TYPE_STALE_RESULT_REFUSED, "long"):
        assert refused.worker_id == holder
        assert refused.fencing_token == leases[0].fencing_token < leases[1].fencing_token
    assert len(invariants.of_type(events, wf.EVENT_TYPE_LEASE_LOST, "long")) == 1
    (finished,) = invariants.of_type(events, wf.EVENT_TYPE_ACTION_FINISHED, "long")
    assert (finished.worker_id, finished.fencing_token) == (other, leases[1].fencing_token)
    (action,) = status.actions
    assert (action.worker_id, action.fencing_token) == (other, leases[1].fencing_token)
    assert action.outputs_json == finished.outputs_json

    # It ran twice, once per host, each under its own lease; the second run's outcome stands.
    executions = runs(marks, "long")
    assert [(fleet.net.host_of_inode(r["ns"]), int(r["token"])) for r in executions] == [
        (holder, leases[0].fencing_token),
        (other, leases[1].fencing_token),
    ], executions
    assert json.loads(finished.outputs_json)["ns"] == fleet.net.netns_inode(other)

    fleet.close()
    summary = journal_check.check_sqlite_journal(fleet.db)
    committed = summary.committed[(workflow_id, "long")]
    assert (committed.worker_id, committed.fencing_token) == (other, leases[1].fencing_token)
    assert summary.of_type(wf.EVENT_TYPE_ACTION_FINISHED) == 1
