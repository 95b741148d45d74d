"""What users, workers and actions wrote never drives the terminal of `plait` (issue 8).

A real coordinator and two real workerd processes, one of them in its own UTS namespace with a
hostile kernel hostname; a workflow whose name holds rich markup and C1 controls, whose action
fails with escape sequences in its error, whose exec action writes them to stdout and stderr, a
cancel reason with them too, and worker labels with rich markup. Each `plait` command runs as
its own process on a pseudo-terminal (TERM=xterm-256color, 300 columns), so rich draws in
colour exactly as it would for a person; what reaches the terminal holds rich's own colours
(SGR) and no other escape sequence, no C1 control, no hyperlink, and every payload is shown
visibly escaped. `plait logs --raw` alone lets the action's bytes through. The classic alias
bomb fails fast, naming the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.system.harness import ROOT, Cluster, Daemon, daemon_env

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

PLAIT = [sys.executable, "-m", "plait.cli.main"]
COLUMNS, LINES = 300, 50

OSC = "\x1b]"  # operating system command: window title, hyperlinks, clipboard...
C1_CSI = "\u009b"  # a CSI in one character, for a terminal that takes C1 controls
HYPERLINK = "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\"
MARKUP = "[link=http://evil.example/]click[/link] [bold]loud[/bold]"


def payload(tag: str) -> str:
    """A title change, a screen clear, a C1 CSI, a hyperlink, and rich markup, tagged."""
    return f"{OSC}0;PWNED-{tag}\x07\x1b[2J{C1_CSI}31m{HYPERLINK}{MARKUP}"


NAME = f"evil {MARKUP} :smile: \x7f{C1_CSI}2J"  # the coordinator refuses C0 in names
# At most 64 bytes. The coordinator refuses a hello whose hostname holds control characters
# (tests/system/test_hostile_input.py), so only markup reaches a table from there.
HOSTNAME = "h[link=http://evil.example/]PWNED-HOST[/link][bold]x"
# Labels must be printable (the coordinator refuses others), so only markup there.
LABEL = "[link=http://evil.example/]l[/link] [bold]L[/bold]"
REVOKE_REASON = f"{C1_CSI}2J[link=http://evil.example/]r[/link] PWNED-REVOKE"  # no C0 there

HANDLERS = f"""
import plait

worker = plait.Worker()


@worker.action("hostile")
def hostile(ctx):
    raise RuntimeError({payload("ERR")!r} + "\\nsecond line")
"""

LOUD = (
    "import sys\n"
    f"sys.stdout.buffer.write({payload('OUT').encode()!r} + b'\\n')\n"
    f"sys.stderr.buffer.write({payload('STDERR').encode()!r} + b'\\r\\n')\n"
    "sys.exit(3)\n"
)

LOL_BOMB = (
    'lol: &lol "lol"\n'
    "lol1: &lol1 [*lol,*lol,*lol,*lol,*lol,*lol,*lol,*lol,*lol]\n"
    + "".join(f"lol{i}: &lol{i} [{','.join([f'*lol{i - 1}'] * 9)}]\n" for i in range(2, 10))
)

# Rich's styling: SGR only (colours, bold, reset). Anything else came from someone's data.
SGR = re.compile(r"\x1b\[[0-9;]*m")
# Rich's live display also hides the cursor, erases lines and moves up over what it drew.
LIVE = re.compile(r"\x1b\[(?:[0-9;]*m|\?25[lh]|2K|[0-9]*A)")
UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def on_pty(target: str | None, *argv: str, timeout: float = 90) -> tuple[int, str]:
    """Runs ``plait ARGV --coordinator TARGET`` with a pseudo-terminal as stdin, stdout and
    stderr (without ``--coordinator`` when ``target`` is None).

    Returns the exit code and everything written to the terminal, decoded as a UTF-8 terminal
    would (a byte that is not UTF-8 stays visible as a surrogate escape).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = daemon_env({"TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)})
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    try:
        proc = subprocess.Popen(
            [*PLAIT, *argv, *(["--coordinator", target] if target else [])],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=ROOT,
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"plait {' '.join(argv)} did not finish in {timeout}s")
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "surrogateescape")


def assert_inert(out: str, what: str, styling: re.Pattern[str] = SGR) -> str:
    """No escape sequence but rich's ``styling``, no C1 or other control; returns the text."""
    plain = styling.sub("", out)
    leftover = UNSAFE.search(plain)
    assert leftover is None, f"{what}: {leftover!r} reached the terminal:\n{out!r}"
    assert OSC not in out and "\x1b]8;" not in out, f"{what}: an OSC reached the terminal"
    assert not re.search("[\udc80-\udcff]", out), f"{what}: raw bytes reached the terminal"
    return plain.replace("\r\n", "\n")


def escaped(tag: str) -> str:
    """How :func:`payload` ``tag``'s title sequence is shown: visibly escaped."""
    return f"\\x1b]0;PWNED-{tag}\\x07"


def hostile_worker(cluster: Cluster, template: Daemon, name: str) -> Daemon:
    """A second workerd like ``template`` (same flags), in its own UTS namespace, whose kernel
    hostname is :data:`HOSTNAME`."""
    argv = list(template.argv)
    assert argv[1:3] == ["-m", "plait.workerd"], argv
    argv[argv.index("--id") + 1] = name
    argv[argv.index("--tmp-root") + 1] = str(cluster.tmp / f"{name}.attempts")  # one each
    wrapper = (
        "import os, runpy, socket, sys\n"
        "socket.sethostname(os.environ.pop('PLAIT_TEST_HOSTNAME'))\n"
        "sys.argv = ['plait.workerd', *sys.argv[1:]]\n"
        "runpy.run_module('plait.workerd', run_name='__main__', alter_sys=True)\n"
    )
    unshare = shutil.which("unshare")
    assert unshare is not None
    full = [unshare, "--uts", argv[0], "-c", wrapper, *argv[3:]]
    env = dict(template.env, PLAIT_TEST_HOSTNAME=HOSTNAME)
    daemon = Daemon(name, full, env, cluster.tmp / f"{name}.log")
    cluster.daemons[name] = daemon
    daemon.start()
    cluster.wait_workers([name])
    return daemon


def _can_unshare_uts() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "--uts", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def test_cli_on_a_terminal_shows_hostile_strings_escaped(
    cluster: Cluster, workerd_available: None, tmp_path: Path
) -> None:
    if not _can_unshare_uts():
        pytest.skip("needs `unshare --uts` (root or CAP_SYS_ADMIN) for a hostile hostname")
    cluster.start_coordinator()
    target = cluster.grpc_target
    handlers = tmp_path / "hostile_handlers.py"
    handlers.write_text(HANDLERS)
    plain = cluster.add_worker("plain", labels={"zone": LABEL}, handlers=[f"{handlers}:worker"])
    hostile_worker(cluster, plain, "evilhost")

    flow = tmp_path / "hostile.yaml"
    flow.write_text(
        f"name: {json.dumps(NAME)}\n"
        "actions:\n"
        f"  - {{id: loud, run: {json.dumps([sys.executable, '-c', LOUD])}}}\n"
        "  - {id: boom, handler: hostile}\n"
    )

    # submit --wait: the workflow fails; its status is drawn with rich.
    code, out = on_pty(target, "submit", str(flow), "--wait")
    text = assert_inert(out, "submit --wait")
    assert code == 1, text
    wid = text.split()[0]
    status = cluster.get(wid)
    assert status.name == NAME  # what the coordinator holds is the hostile text itself
    assert "[link=http://evil.example/]click[/link]" in text and ":smile:" in text
    assert "\\x7f\\x9b2J" in text
    assert escaped("ERR") in text and "second line" in text

    # submit --watch: the live view (rich's cursor movements only), then the status.
    code, out = on_pty(target, "submit", str(flow), "--watch")
    text = assert_inert(out, "submit --watch", styling=LIVE)
    assert code == 1, text
    assert "\\x7f\\x9b2J" in text  # the name, in the view's title and the status
    assert f"{escaped('ERR')}\\x1b[2J" in text and "second line" in text

    # A second workflow that cannot run (no worker has the label), cancelled with a reason.
    waiting = tmp_path / "waiting.yaml"
    waiting.write_text("name: waiting\nactions: [{id: w, run: [true], selector: {never: here}}]\n")
    code, out = on_pty(target, "submit", str(waiting))
    waiting_id = assert_inert(out, "submit").strip()
    assert code == 0 and waiting_id.startswith("wf-"), out
    code, out = on_pty(target, "cancel", waiting_id, "--reason", payload("CANCEL"))
    assert code == 0, assert_inert(out, "cancel")

    for argv, shown in [
        (("status", wid), [escaped("ERR"), "[bold]loud[/bold]"]),
        (("status", waiting_id), [escaped("CANCEL")]),
        (("list",), ["[link=http://evil.example/]click[/link]"]),
        (("events", wid), [escaped("ERR")]),
        (("events", waiting_id), [escaped("CANCEL")]),
        (("logs", wid, "loud"), [escaped("OUT"), escaped("STDERR"), "\\x9b31m"]),
    ]:
        code, out = on_pty(target, *argv)
        text = assert_inert(out, " ".join(argv))
        assert code == 0, text
        for piece in shown:
            assert piece in text, f"plait {' '.join(argv)} does not show {piece!r}:\n{text}"

    code, out = on_pty(target, "revoke", "ghost", "--reason", REVOKE_REASON)
    assert code == 0, assert_inert(out, "revoke")
    code, out = on_pty(target, "workers")
    text = assert_inert(out, "workers")
    assert code == 0, text
    for piece in (HOSTNAME, f"zone={LABEL}", "\\x9b2J[link=", "PWNED-REVOKE"):
        assert piece in text, f"plait workers does not show {piece!r}:\n{text}"

    # --raw prints what the action wrote, byte for byte.
    code, out = on_pty(target, "logs", wid, "loud", "--raw")
    assert code == 0, out
    assert payload("OUT") in out and payload("STDERR") in out


def test_alias_bomb_fails_within_a_second_naming_the_file(tmp_path: Path) -> None:
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(LOL_BOMB)
    start = time.monotonic()
    # Validation happens before the coordinator is dialled: nothing listens there.
    code, out = on_pty("127.0.0.1:1", "submit", str(bomb))
    text = assert_inert(out, "submit lol.yaml")
    assert code == 2, text
    assert str(bomb) in text and "aliases expand to more than 1,000,000 nodes" in text, text
    assert time.monotonic() - start < 10  # the process, interpreter start-up included


def test_plait_run_live_view_on_a_terminal_shows_hostile_strings_escaped(
    cluster: Cluster, workerd_available: None, tmp_path: Path
) -> None:
    """`plait run` draws a live view (rich Live) and then a summary: neither lets data through."""
    handlers = tmp_path / "hostile_handlers.py"
    handlers.write_text(HANDLERS)
    slow_loud = "import time\ntime.sleep(1)\n" + LOUD  # running long enough to be drawn
    flow = tmp_path / "hostile.yaml"
    flow.write_text(
        f"name: {json.dumps(NAME)}\n"
        "actions:\n"
        f"  - {{id: loud, run: {json.dumps([sys.executable, '-c', slow_loud])}}}\n"
        "  - {id: boom, handler: hostile}\n"
    )
    code, out = on_pty(
        None,  # `plait run` starts its own coordinator
        "run",
        str(flow),
        "--workers",
        "1",
        "--handlers",
        f"{handlers}:worker",
        "--store",
        f"sqlite:///{tmp_path}/run/plait.db",
    )
    text = assert_inert(out, "run", styling=LIVE)
    assert code == 1, text
    assert "\x1b[2J" not in out
    assert "[link=http://evil.example/]click[/link] [bold]loud[/bold] :smile: \\x7f\\x9b2J" in text
    assert escaped("ERR") in text and "second line" in text
