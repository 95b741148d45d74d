"""The exec sandbox is a boundary (issue 8): each attack a hostile action tried, on real processes.

* a ``setsid -f`` child dies within kill grace + 1 s after its attempt ends and after a cancel,
  with cgroup containment and with the uid sweep;
* a FIFO, a symlink or a ``/dev/zero`` node at ``$PLAIT_OUTPUT`` fails that attempt naming
  ``PLAIT_OUTPUT``, while a bystander attempt on the same worker keeps its lease;
* canaries in workerd's environment and in another attempt's environment and files are
  unreadable from an action run with ``--run-as`` (and readable without it: the probe works);
* no attempt directory survives a SIGKILLed workerd once it is restarted;
* rlimits: a fork bomb is held by the processes limit, a 200 MB file fails under the default
  file-size limit, an action asking above the worker's cap fails naming the field;
* start-up refuses exec as root, as uid 0, and as the coordinator's uid (exit 2).

The tests run as root: ``--run-as`` uses numeric uids without passwd entries (62xxx), and a tmp
root under ``/var/tmp`` (pytest's own tmp dirs are 0700, which the run-as users cannot cross).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from plait.v1 import workflow_pb2 as wf
from plait.workerd.containment import own_cgroup_dir, uid_processes
from tests import procs
from tests.system.harness import (
    EXIT_DEADLINE_S,
    ROOT,
    Cluster,
    Daemon,
    daemon_env,
    describe,
    wait_for,
    workflow,
)

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("workerd_available"),
]

# Cancellation reaches the worker over its stream; then TERM, kill grace, KILL (as test_cancel).
KILL_DEADLINE_S = EXIT_DEADLINE_S + 0.75
PYTHON3 = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="--run-as needs root")


def cgroups_usable() -> bool:
    base = own_cgroup_dir()
    return base is not None and os.access(base, os.W_OK)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under /var/tmp that run-as users may traverse, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="plait-sandbox-test-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def sandboxed_worker(
    cluster: Cluster,
    name: str,
    tmp: Path,
    run_as: str,
    *extra: str,
    slots: int = 4,
    env: dict[str, str] | None = None,
) -> Daemon:
    """A workerd running its actions as the ``run_as`` pool (no --allow-root)."""
    return cluster.add_worker(
        name,
        slots=slots,
        env=env,
        allow_root=False,
        tmp_root=tmp / name,
        extra_args=["--run-as", run_as, *extra],
    )


def sh_action(action_id: str, script: str, **fields: Any) -> wf.ActionSpec:
    timeout_s = fields.pop("timeout_s", None)
    action = wf.ActionSpec(id=action_id, exec=wf.ExecAction(argv=[script], shell=True), **fields)
    if timeout_s is not None:
        action.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout_s)))
    return action


def action_status(status: wf.WorkflowStatus, action_id: str) -> wf.ActionStatus:
    return next(a for a in status.actions if a.action_id == action_id)


def attempt_files(root: Path, name: str) -> list[Path]:
    return sorted(root.glob(f"plait-attempt-*/{name}"))


# ----- processes that leave the group ------------------------------------------------------------

# A child in a session of its own that ignores SIGTERM: only a SIGKILL that finds it outside the
# attempt's process group (cgroup.kill, the uid sweep) can stop it.
ESCAPE = r"""
setsid -f /bin/sh -c 'trap "" TERM; echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 1000' \
    "$TMPDIR/escaped.pid"
while [ ! -s "$TMPDIR/escaped.pid" ]; do sleep 0.01; done
printf '{"pid": %s}' "$(cat "$TMPDIR/escaped.pid")" > "$PLAIT_OUTPUT"
"""
CONTAINMENT = [
    pytest.param(
        [],
        "containment: cgroup",
        id="cgroup",
        marks=pytest.mark.skipif(not cgroups_usable(), reason="no writable cgroup v2 here"),
    ),
    pytest.param(["--cgroup", "off"], "containment: uid sweep", id="uid-sweep"),
]


@needs_root
@pytest.mark.parametrize(("flags", "logged"), CONTAINMENT)
def test_setsid_child_dies_when_its_attempt_ends(
    cluster: Cluster, shared_tmp: Path, flags: list[str], logged: str
) -> None:
    cluster.start_coordinator()
    worker = sandboxed_worker(cluster, "w1", shared_tmp, "62100-62103", *flags)
    assert logged in worker.log_tail()
    workflow_id = cluster.submit(workflow("escape", [sh_action("escape", ESCAPE)]))
    status = cluster.wait_workflow(workflow_id)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    pid = json.loads(action_status(status, "escape").outputs_json)["pid"]
    # The attempt cleaned up before it reported, so it is already gone; allow the deadline.
    wait_for(
        f"the setsid child {pid} to die",
        lambda: not procs.is_alive(pid),
        timeout=EXIT_DEADLINE_S,
    )


@needs_root
@pytest.mark.parametrize(("flags", "logged"), CONTAINMENT)
def test_setsid_child_dies_when_its_attempt_is_cancelled(
    cluster: Cluster, shared_tmp: Path, flags: list[str], logged: str
) -> None:
    cluster.start_coordinator()
    worker = sandboxed_worker(cluster, "w1", shared_tmp, "62110-62113", *flags)
    assert logged in worker.log_tail()
    script = ESCAPE + "exec sleep 1000\n"
    workflow_id = cluster.submit(workflow("escape-cancel", [sh_action("escape", script)]))
    pid_file = wait_for(
        "the setsid child to start",
        lambda: next(iter(attempt_files(shared_tmp / "w1", "escaped.pid")), None),
    )
    pid = int(pid_file.read_text())
    assert procs.is_alive(pid)
    cluster.cancel(workflow_id, reason="test cancels")
    wait_for(
        f"the setsid child {pid} to die", lambda: not procs.is_alive(pid), timeout=KILL_DEADLINE_S
    )
    status = cluster.wait_workflow(workflow_id)
    assert status.state == wf.WORKFLOW_STATE_CANCELLED, describe(status)


# ----- $PLAIT_OUTPUT that is not a plain file ----------------------------------------------------


def test_hostile_outputs_fail_that_attempt_while_heartbeats_go_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"stolen": "from outside the attempt directory"}')
    cluster.start_coordinator()
    # Without --run-as the actions run as root here, which lets one create a device node.
    cluster.add_worker("w1", slots=4)
    spec = workflow(
        "hostile-outputs",
        [
            # Longer than 3 x the lease TTL (2 s): it only succeeds, on its first attempt and
            # without a lease loss, if heartbeats kept flowing throughout.
            sh_action("bystander", 'sleep 6.5; echo \'{"ok": true}\' > "$PLAIT_OUTPUT"'),
            sh_action("fifo", 'mkfifo "$PLAIT_OUTPUT"'),
            sh_action("symlink", f'ln -s {outside} "$PLAIT_OUTPUT"'),
            sh_action("devzero", 'mknod "$PLAIT_OUTPUT" c 1 5'),
        ],
    )
    workflow_id = cluster.submit(spec)
    status = cluster.wait_workflow(workflow_id, timeout=60)
    bystander = action_status(status, "bystander")
    assert bystander.state == wf.ACTION_STATE_SUCCEEDED, describe(status)
    assert (bystander.attempt, bystander.lease_losses) == (1, 0), describe(status)
    expected = {
        "fifo": "is a FIFO (named pipe), not a regular file",
        "symlink": "is a symbolic link",
        "devzero": "is a character device, not a regular file",
    }
    for action_id, words in expected.items():
        a = action_status(status, action_id)
        assert a.state == wf.ACTION_STATE_FAILED, describe(status)
        assert "PLAIT_OUTPUT" in a.error.message and words in a.error.message, a.error.message
        assert "stolen" not in a.outputs_json


# ----- what one action can read of others --------------------------------------------------------

VICTIM = r"""
cat "$PLAIT_INPUTS_FILE" > "$TMPDIR/secret.txt"
touch "/tmp/$MARK-ready"
i=0
while [ ! -e "/tmp/$MARK-done" ] && [ $i -lt 6000 ]; do sleep 0.01; i=$((i+1)); done
echo '{}' > "$PLAIT_OUTPUT"
"""
# Looks for the canaries everywhere an action could: every process's environ, cwd and open
# files, the tmp root (and every attempt directory in it), the inputs files of others.
PROBE = r"""
import glob, json, os, stat, sys, time
inputs = json.load(sys.stdin)["input"]
canaries, mark, tmp_root = inputs["canaries"], inputs["mark"], inputs["tmp_root"]
deadline = time.monotonic() + 60
while not os.path.exists(f"/tmp/{mark}-ready") and time.monotonic() < deadline:
    time.sleep(0.01)
found, own, readable = set(), False, 0

def look(path):
    # Non-blocking, regular files only: an fd may be a pipe that never ends.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            data = os.read(fd, 1 << 20)
            found.update(c for c in canaries if c.encode() in data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)

for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        try:
            own = os.environ["PROBE_CANARY"].encode() in open("/proc/self/environ", "rb").read()
        except OSError:
            pass
        continue
    paths = [f"/proc/{pid}/environ", f"/proc/{pid}/cwd/secret.txt",
             f"/proc/{pid}/cwd/plait-inputs.json"]
    try:
        paths += [os.path.join(f"/proc/{pid}/fd", fd) for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        pass
    readable += sum(look(path) for path in paths)
for path in glob.glob(os.path.join(tmp_root, "*", "*")) + glob.glob("/tmp/plait-attempt-*/*"):
    look(path)
open(f"/tmp/{mark}-done", "w").close()
json.dump({"found": sorted(found), "own": own, "readable": readable},
          open(os.environ["PLAIT_OUTPUT"], "w"))
"""


def probe_workflow(tmp_root: Path, mark: str, canaries: dict[str, str]) -> wf.WorkflowSpec:
    victim = sh_action("victim", VICTIM, input_json=json.dumps({"canary": canaries["input"]}))
    victim.env.update({"MARK": mark, "VICTIM_CANARY": canaries["env"]})
    probe = wf.ActionSpec(
        id="probe",
        exec=wf.ExecAction(argv=[PYTHON3, "-c", PROBE]),
        input_json=json.dumps(
            {"canaries": sorted(canaries.values()), "mark": mark, "tmp_root": str(tmp_root)}
        ),
    )
    probe.env["PROBE_CANARY"] = "probe-" + mark
    return workflow("probe", [victim, probe])


def run_probe(cluster: Cluster, tmp_root: Path, workerd_canary: str) -> dict[str, Any]:
    mark = f"plait-probe-{uuid.uuid4().hex}"
    canaries = {
        "workerd": workerd_canary,
        "env": f"env-canary-{uuid.uuid4().hex}",
        "input": f"input-canary-{uuid.uuid4().hex}",
    }
    try:
        workflow_id = cluster.submit(probe_workflow(tmp_root, mark, canaries))
        status = cluster.wait_workflow(workflow_id, timeout=90)
    finally:
        for suffix in ("ready", "done"):
            Path(f"/tmp/{mark}-{suffix}").unlink(missing_ok=True)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    return dict(json.loads(action_status(status, "probe").outputs_json))


@needs_root
def test_canaries_are_unreadable_from_a_run_as_action(cluster: Cluster, shared_tmp: Path) -> None:
    canary = f"workerd-canary-{uuid.uuid4().hex}"
    cluster.start_coordinator()
    sandboxed_worker(cluster, "w1", shared_tmp, "62200-62203", env={"PLAIT_TEST_CANARY": canary})
    report = run_probe(cluster, shared_tmp / "w1", canary)
    assert report["own"], report  # the probe reads what its own uid may: it works
    assert report["found"] == [], report


def test_without_run_as_the_probe_finds_the_canaries(cluster: Cluster) -> None:
    """The control: actions sharing workerd's uid read its environment and each other's."""
    canary = f"workerd-canary-{uuid.uuid4().hex}"
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=4, env={"PLAIT_TEST_CANARY": canary})
    report = run_probe(cluster, cluster.tmp / "w1.attempts", canary)
    assert len(report["found"]) == 3, report


# ----- a SIGKILLed workerd -----------------------------------------------------------------------


def test_no_attempt_dir_survives_a_sigkilled_workerd(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=2)
    root = cluster.tmp / "w1.attempts"
    script = (
        'cp "$PLAIT_INPUTS_FILE" "$TMPDIR/inputs-copy"\n'
        'if [ "$PLAIT_ATTEMPT" = 1 ]; then exec sleep 1000; fi\n'
        "echo '{}' > \"$PLAIT_OUTPUT\"\n"
    )
    action = sh_action("work", script, input_json='{"secret": "inputs of attempt one"}')
    workflow_id = cluster.submit(workflow("killed", [action]))
    first = wait_for("the first attempt's directory", lambda: attempt_files(root, "inputs-copy"))[
        0
    ].parent
    cluster.kill("w1")
    cluster.restart("w1")
    cluster.wait_workers(["w1"])
    assert not first.exists(), f"{first} survived the restart"
    status = cluster.wait_workflow(workflow_id, timeout=60)
    assert status.state == wf.WORKFLOW_STATE_SUCCEEDED, describe(status)
    assert list(root.iterdir()) == []


# ----- rlimits -----------------------------------------------------------------------------------

# Every process forks for ever; a failed fork (the processes limit) is retried, so the bomb
# stays at the limit until the run timeout kills it (a shell bomb dies out on its own).
FORK_BOMB = r"""
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


@needs_root
def test_a_fork_bomb_is_held_by_the_processes_limit(cluster: Cluster, shared_tmp: Path) -> None:
    uids = list(range(62300, 62304))
    cluster.start_coordinator()
    sandboxed_worker(cluster, "w1", shared_tmp, "62300-62303", "--cgroup", "off", slots=2)
    bomb = wf.ActionSpec(id="bomb", exec=wf.ExecAction(argv=[PYTHON3, "-c", FORK_BOMB]))
    bomb.timeout.CopyFrom(duration_pb2.Duration(seconds=4))
    bomb.rlimits.processes = 48
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            counts: dict[int, int] = {}
            for _, uid, _ in uid_processes(uids):
                counts[uid] = counts.get(uid, 0) + 1
            peak[0] = max([peak[0], *counts.values()])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        workflow_id = cluster.submit(workflow("bomb", [bomb]))
        status = cluster.wait_workflow(workflow_id, timeout=60)
    finally:
        stop.set()
        sampler.join(5)
    a = action_status(status, "bomb")
    assert a.state == wf.ACTION_STATE_TIMED_OUT, describe(status)
    assert 8 <= peak[0] <= 48, f"peak of {peak[0]} processes of one uid"
    wait_for(
        "every process of the bomb's uid to die",
        lambda: not uid_processes(uids),
        timeout=EXIT_DEADLINE_S,
    )


LIMITS = r"""
import json, os
want = {"Max open files": "nofile", "Max file size": "fsize", "Max core file size": "core",
        "Max address space": "as", "Max processes": "nproc"}
out = {}
for line in open("/proc/self/limits"):
    for label, key in want.items():
        if line.startswith(label):
            out[key] = line[len(label):].split()[0]
json.dump(out, open(os.environ["PLAIT_OUTPUT"], "w"))
"""
# 200 MB from a program that, unlike Python, does not ignore SIGXFSZ.
BIG_FILE = 'exec head -c 200000000 /dev/zero > "$TMPDIR/big"'


def test_rlimits_defaults_per_action_and_caps(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=3)
    limits = wf.ActionSpec(id="limits", exec=wf.ExecAction(argv=[PYTHON3, "-c", LIMITS]))
    limits.rlimits.open_files = 100
    too_much = sh_action("too-much", "echo '{}' > \"$PLAIT_OUTPUT\"")
    too_much.rlimits.file_size_bytes = 1 << 30
    too_much.retry.max_attempts = 3
    big = sh_action("big-file", BIG_FILE)
    workflow_id = cluster.submit(workflow("limits", [limits, too_much, big]))
    status = cluster.wait_workflow(workflow_id, timeout=60)

    got = json.loads(action_status(status, "limits").outputs_json)
    assert got == {
        "nofile": "100",  # the action's own, within the cap
        "fsize": str(128 << 20),
        "core": "0",
        "as": str(16 << 30),
        "nproc": got["nproc"],  # without --run-as: inherited (per uid, see docs)
    }, got

    refused = action_status(status, "too-much")
    assert refused.state == wf.ACTION_STATE_FAILED, describe(status)
    assert refused.attempt == 1, "a request above the cap must not be retried"
    assert "rlimits.file_size" in refused.error.message, refused.error.message
    assert "cap of 128MiB" in refused.error.message, refused.error.message

    a = action_status(status, "big-file")
    assert a.state == wf.ACTION_STATE_FAILED, describe(status)
    assert a.exit_code == -25, describe(status)  # SIGXFSZ
    assert "file-size limit" in a.error.message, a.error.message


# ----- start-up refusals -------------------------------------------------------------------------


def start_workerd(*flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in daemon_env().items() if not k.startswith("PLAIT_")}
    return subprocess.run(
        [sys.executable, "-m", "plait.workerd", "--id", "refused", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@needs_root
def test_startup_refuses_root_without_run_as() -> None:
    done = start_workerd("--coordinator", "127.0.0.1:1")
    assert done.returncode == 2, done
    assert "runs as root" in done.stderr
    assert "--run-as" in done.stderr and "--allow-root" in done.stderr, done.stderr


def test_startup_refuses_run_as_uid_zero() -> None:
    done = start_workerd("--coordinator", "127.0.0.1:1", "--run-as", "0")
    assert done.returncode == 2, done
    assert "--run-as 0" in done.stderr and "root's uid" in done.stderr, done.stderr
    assert "--allow-root" in done.stderr


@needs_root
def test_startup_refuses_the_coordinators_uid(shared_tmp: Path) -> None:
    # Anything listening on the loopback port stands for the coordinator: what counts is
    # whose socket it is, and workerd decides before it connects.
    listener = subprocess.Popen(
        [
            "setpriv", "--reuid", "62400", "--regid", "62400", "--clear-groups", PYTHON3, "-c",
            "import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        done = start_workerd(
            "--coordinator", f"127.0.0.1:{port}", "--run-as", "62400",
            "--tmp-root", str(shared_tmp / "refused"),
        )  # fmt: skip
        assert done.returncode == 2, done
        assert f"the coordinator at 127.0.0.1:{port} runs as uid 62400" in done.stderr, done
        assert "--allow-root" in done.stderr
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout is not None:
            listener.stdout.close()


def test_startup_refuses_a_shared_tmp_root(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.add_worker("w1", slots=1)
    done = start_workerd(
        "--coordinator", cluster.grpc_target, "--allow-root",
        "--tmp-root", str(cluster.tmp / "w1.attempts"),
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert "in use by another workerd" in done.stderr, done.stderr
    assert cluster.daemon("w1").running()
