"""Terminal safety of the CLI's output, and the bounds of the YAML loader (issue 8).

What users, workers and actions wrote (names, reasons, errors, hostnames, labels, log tails) is
shown with its control characters escaped and its rich markup uninterpreted; a workflow file of
nested aliases fails fast, naming the file and the limit.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from rich.console import Console, RenderableType
from rich.text import Text

from plait.cli import render
from plait.cli.main import main
from plait.cli.progress import RunProgress, live_view
from plait.cli.render import cell, clean
from plait.spec import SpecError, load_workflow, loads_workflow
from plait.spec import files as spec_files
from plait.v1 import admin_service_pb2 as admin_pb
from plait.v1 import workflow_pb2 as pb
from plait.v1 import workflow_service_pb2 as ws_pb

OSC_TITLE = "\x1b]0;PWNED\x07"
CLEAR = "\x1b[2J"
C1_CSI = "\x9b31m"
HYPERLINK = "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\"
MARKUP = "[link=http://x]hi[/link] [bold]B[/bold] :smile:"
HOSTILE = f"{OSC_TITLE}{CLEAR}{C1_CSI}{HYPERLINK}\x7f\u202e{MARKUP}"
# What a terminal may see from the CLI: rich's own colours (SGR), nothing else.
SGR = re.compile(r"\x1b\[[0-9;]*m")
C1 = re.compile("[\x80-\x9f]")

# The classic "billion laughs": 9 levels of 9 aliases, about 10^9 strings once expanded.
LOL_BOMB = (
    'lol: &lol "lol"\n'
    "lol1: &lol1 [*lol,*lol,*lol,*lol,*lol,*lol,*lol,*lol,*lol]\n"
    + "".join(f"lol{i}: &lol{i} [{','.join([f'*lol{i - 1}'] * 9)}]\n" for i in range(2, 10))
)


def terminal(renderable: RenderableType | str, width: int = 200) -> str:
    """What a colour terminal would be sent for ``renderable`` (rich's styling included)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return buf.getvalue()


def assert_inert(out: str) -> None:
    """No escape sequence but rich's colours, no C1 control, and the payloads shown visibly."""
    assert SGR.sub("", out).count("\x1b") == 0, repr(out)
    assert not C1.search(out), repr(out)
    assert "\u202e" not in out and "\x7f" not in out and "\x07" not in out


# -- the helper ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x00\x01\x07\x08", "\\x00\\x01\\x07\\x08"),
        (OSC_TITLE, "\\x1b]0;PWNED\\x07"),
        (CLEAR, "\\x1b[2J"),
        ("\x7f", "\\x7f"),
        (C1_CSI, "\\x9b31m"),
        ("a\x85b\x9dc", "a\\x85b\\x9dc"),  # NEL; OSC as a C1 control
        ("left\u202eright\u2066x\u2069", "left\\u202eright\\u2066x\\u2069"),
        ("one\ntwo\tthree\r", "one\\ntwo\\tthree\\r"),
        ("\u2028", "\\u2028"),
    ],
)
def test_clean_shows_every_control_character_escaped(raw: str, shown: str) -> None:
    assert clean(raw) == shown
    assert clean(raw).isprintable()


def test_clean_keeps_printable_text_as_is_without_copying() -> None:
    for text in ("plain", "名前 ünïcode ✓", "[link=http://x]hi[/link]", "back\\slash", ""):
        assert clean(text) is text
    nbsp = "a\u00a0b"  # not printable to Python, but harmless: kept
    assert clean(nbsp) == nbsp


def test_clean_multiline_keeps_lines_and_tabs_only() -> None:
    text = f"line one\r\nline\ttwo\rthree{OSC_TITLE}\x9b2J\n"
    assert clean(text, multiline=True) == "line one\nline\ttwo\nthree\\x1b]0;PWNED\\x07\\x9b2J\n"


def test_cell_does_not_interpret_rich_markup() -> None:
    out = terminal(cell(MARKUP))
    assert "[link=http://x]hi[/link] [bold]B[/bold] :smile:" in SGR.sub("", out)
    assert "\x1b]8;" not in out and "😄" not in out
    # The same string as markup is a hyperlink: what the cells protect against.
    assert "\x1b]8;" in terminal(MARKUP)


# -- every renderer --------------------------------------------------------------------------


def hostile_status() -> pb.WorkflowStatus:
    st = pb.WorkflowStatus(
        workflow_id="wf-1",
        name=HOSTILE,
        state=pb.WORKFLOW_STATE_FAILED,
        reason=f"failed: b ({HOSTILE})",
        idempotency_key=HOSTILE,
    )
    st.action_counts["ACTION_STATE_FAILED"] = 1
    b = st.actions.add(action_id="b", state=pb.ACTION_STATE_FAILED, attempt=1, worker_id="w1")
    b.error.message = f"RuntimeError: {HOSTILE}\nsecond line"
    st.actions.add(action_id="c", state=pb.ACTION_STATE_PENDING, reason=HOSTILE)
    return st


def test_status_header_and_actions_table_are_inert() -> None:
    st = hostile_status()
    header = "\n".join(terminal(Text(line)) for line in render.workflow_header(st))
    table = terminal(render.actions_table(st.actions))
    for out in (header, table):
        assert_inert(out)
        assert "\\x1b]0;PWNED\\x07" in out and "[link=http://x]hi[/link]" in SGR.sub("", out)
    assert "second line" in table  # a multi-line error keeps its lines in the cell


def test_list_table_is_inert() -> None:
    out = terminal(render.workflows_table([hostile_status()]))
    assert_inert(out)
    assert "PWNED" in out


def test_workers_and_revoked_tables_are_inert() -> None:
    w = admin_pb.WorkerInfo(worker_id="w1", hostname=HOSTILE, slots=4, handlers=["h"])
    w.labels["zone"] = HOSTILE
    r = admin_pb.RevokedWorker(worker_id="w2", revoked_by=HOSTILE, reason=HOSTILE)
    for renderable in (render.workers_table([w]), render.revoked_table([r])):
        out = terminal(renderable, width=400)
        assert_inert(out)
        assert "PWNED" in out
    assert "zone=" in terminal(render.workers_table([w]), width=400)


def test_event_lines_stay_one_line_and_inert() -> None:
    e = pb.HistoryEvent(
        sequence=7,
        type=pb.EVENT_TYPE_ACTION_FINISHED,
        action_id="b",
        worker_id="w1",
        action_state=pb.ACTION_STATE_FAILED,
        message=f"one\ntwo {HOSTILE}",
    )
    e.error.message = HOSTILE + "!"
    line = render.event_line(e)
    assert "\n" not in line and line.isprintable()
    assert "one\\ntwo \\x1b]0;PWNED\\x07" in line


def test_logs_are_escaped_unless_raw() -> None:
    a = ws_pb.AttemptLogs(
        attempt=1,
        worker_id="w1",
        state=pb.ACTION_STATE_FAILED,
        stdout_tail=f"out {OSC_TITLE}\nnext\tcol\n",
        stderr_tail=f"err {C1_CSI}{CLEAR}\r\n",
    )
    text = render.logs_text([a])
    assert_inert(text)
    assert "out \\x1b]0;PWNED\\x07\nnext\tcol" in text  # lines and tabs kept
    assert "err \\x9b31m\\x1b[2J" in text
    raw = render.logs_text([a], raw=True)
    assert f"out {OSC_TITLE}\nnext\tcol" in raw and f"err {C1_CSI}{CLEAR}" in raw


def test_progress_lines_and_live_view_are_inert() -> None:
    spec = pb.WorkflowSpec(name=HOSTILE)
    spec.actions.add(id="b", handler="h")
    p = RunProgress(spec, "wf-1")
    started = pb.HistoryEvent(
        sequence=1,
        type=pb.EVENT_TYPE_ACTION_STARTED,
        action_id="b",
        worker_id="w1",
        attempt=1,
        action_state=pb.ACTION_STATE_RUNNING,
    )
    assert p.apply(started)
    out = terminal(live_view(p, now_ms=0))
    assert_inert(out)
    assert "[link=http://x]hi[/link]" in SGR.sub("", out)
    finished = pb.HistoryEvent(
        sequence=2,
        type=pb.EVENT_TYPE_ACTION_FINISHED,
        action_id="b",
        worker_id="w1",
        action_state=pb.ACTION_STATE_FAILED,
    )
    finished.error.message = f"boom\n{HOSTILE}"
    done = pb.HistoryEvent(
        sequence=3,
        type=pb.EVENT_TYPE_WORKFLOW_FINISHED,
        workflow_state=pb.WORKFLOW_STATE_FAILED,
        message=HOSTILE,
    )
    for event in (finished, done):
        line = p.apply(event)
        assert line is not None and line.isprintable() and "PWNED" in line, line


def test_errors_printed_by_main_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text('name: ok\nactions: [{id: a, run: [true], bogus: "{x}"}]\n"\\e]0;T\\a": 1\n')
    assert main(["submit", str(flow), "--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plait: error: ") and str(flow) in err
    assert "\x1b" not in err and "\x07" not in err


# -- bounded YAML ----------------------------------------------------------------------------


def test_alias_bomb_fails_fast_naming_the_file_and_the_limit(tmp_path: Path) -> None:
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(LOL_BOMB)
    assert len(LOL_BOMB) < 1024
    start = time.monotonic()
    with pytest.raises(SpecError) as info:
        load_workflow(bomb)
    assert time.monotonic() - start < 1.0  # the safety deadline the issue names
    assert str(bomb) in info.value.message
    assert f"{spec_files.MAX_YAML_ALIAS_NODES:,} nodes" in info.value.message


def test_alias_bomb_through_the_cli_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(LOL_BOMB)
    assert main(["submit", str(bomb), "--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "aliases expand to more than" in err


def test_recursive_alias_and_deep_nesting_are_refused() -> None:
    with pytest.raises(SpecError, match="recursive alias"):
        loads_workflow("name: x\nactions: &a [*a]\n", source="rec.yaml")
    deep = "name: x\nactions: [{id: a, run: [true], input: {k: " + "[" * 200 + "]" * 200 + "}}]\n"
    with pytest.raises(SpecError, match=r"deep\.yaml: .*more than 100 levels deep"):
        loads_workflow(deep, source="deep.yaml")


def test_a_file_over_the_size_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SpecError, match=r"/dev/zero: is more than 16,777,216 bytes"):
        load_workflow("/dev/zero")
    monkeypatch.setattr(spec_files, "MAX_YAML_BYTES", 64)
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nactions: [{id: a, run: [true]}]\n" + "#" * 64 + "\n")
    with pytest.raises(SpecError, match=r"big\.yaml: is more than 64 bytes"):
        load_workflow(big)
    with pytest.raises(SpecError, match="more than 64 characters"):
        loads_workflow(big.read_text(), source="big.yaml")


def test_a_file_with_a_few_anchors_still_loads() -> None:
    spec = loads_workflow(
        "name: anchors\n"
        "actions:\n"
        '  - {id: a, run: [echo, a], env: &env {A: "1", B: "2"}, retry: &retry {max_attempts: 3}}\n'
        "  - {id: b, needs: [a], run: [echo, b], env: *env, retry: *retry}\n"
        "  - &c {id: c, needs: [a], run: [echo, c]}\n"
        "  - {<<: *c, id: d}\n"
    )
    assert [a.id for a in spec.actions] == ["a", "b", "c", "d"]
    assert dict(spec.actions[1].env) == {"A": "1", "B": "2"}
    assert spec.actions[1].retry.max_attempts == 3
    assert list(spec.actions[3].exec.argv) == ["echo", "c"]


def test_many_aliases_within_the_limit_load() -> None:
    # `env: *env` on 2,000 actions: 2,000 x 5 nodes through aliases, far under the limit.
    lines = ["name: many", "actions:", '  - {id: a0, run: [x], env: &env {A: "1", B: "2"}}']
    lines += [f"  - {{id: a{i}, run: [x], env: *env}}" for i in range(1, 2000)]
    spec = loads_workflow("\n".join(lines) + "\n")
    assert len(spec.actions) == 2000 and spec.actions[-1].env["B"] == "2"
