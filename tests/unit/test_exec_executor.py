"""The exec executor with real processes: sandbox, environment, inputs, outputs, tails, exit
codes and templates. Cancel, timeouts, process groups and the keeper are in
:mod:`tests.unit.test_exec_process_control`; the ``executor`` fixture is in this directory's
``conftest.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plait.v1 import worker_service_pb2 as pb
from plait.worker.executor import Code
from plait.workerd.exec_executor import ExecExecutor, read_outputs
from tests.unit.exec_support import (
    exec_lease,
    py,
    run_lease,
)


async def test_outputs_from_plait_output(executor: ExecExecutor) -> None:
    lease = exec_lease(
        py("""
        import json, os
        json.dump({"answer": 42, "nested": {"ok": True}}, open(os.environ["PLAIT_OUTPUT"], "w"))
        print("hello stdout")
        """)
    )
    r = await run_lease(executor, lease)
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
    assert json.loads(r.outputs_json) == {"answer": 42, "nested": {"ok": True}}
    assert r.exit_code == 0
    assert r.stdout_tail == "hello stdout\n"


async def test_environment_is_scrubbed(
    executor: ExecExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLAIT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    lease = exec_lease(
        py("""
        import json, os
        json.dump(dict(os.environ), open(os.environ["PLAIT_OUTPUT"], "w"))
        """),
        env={"MY_VAR": "from-spec"},
        static_input={"k": "v"},
    )
    r = await run_lease(executor, lease)
    env = json.loads(r.outputs_json)
    expected = {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "MY_VAR",
        "PLAIT_WORKFLOW_ID",
        "PLAIT_ACTION_ID",
        "PLAIT_ATTEMPT",
        "PLAIT_FENCING_TOKEN",
        "PLAIT_IDEMPOTENCY_KEY",
        "PLAIT_LEASE_ID",
        "TRACEPARENT",
        "PLAIT_OUTPUT",
        "PLAIT_INPUTS",
        "PLAIT_INPUTS_FILE",
    }
    assert set(env) == expected
    assert "hunter2" not in json.dumps(env)
    tmp = os.path.dirname(env["PLAIT_OUTPUT"])
    assert env["HOME"] == env["TMPDIR"] == tmp
    assert env["LANG"] == "C.UTF-8"
    assert env["MY_VAR"] == "from-spec"
    assert env["PLAIT_WORKFLOW_ID"] == "wf-1"
    assert env["PLAIT_ACTION_ID"] == "act"
    assert env["PLAIT_ATTEMPT"] == "2"
    assert env["PLAIT_FENCING_TOKEN"] == "42"
    assert env["PLAIT_IDEMPOTENCY_KEY"] == "wf-1/act"
    assert env["PLAIT_LEASE_ID"] == "lease-1"
    assert env["TRACEPARENT"].startswith("00-0af7")
    assert json.loads(env["PLAIT_INPUTS"]) == {"input": {"k": "v"}, "needs": {}}


async def test_inputs_on_stdin_env_and_file(executor: ExecExecutor) -> None:
    inputs = {
        "input": {"name": "x"},
        "needs": {"a": {"state": "ACTION_STATE_SUCCEEDED", "outputs": {"n": 1}}},
    }
    lease = exec_lease(
        py("""
        import json, os, sys
        out = {"stdin": sys.stdin.read(), "env": os.environ["PLAIT_INPUTS"],
               "file": open(os.environ["PLAIT_INPUTS_FILE"]).read()}
        json.dump(out, open(os.environ["PLAIT_OUTPUT"], "w"))
        """),
        inputs_json=json.dumps(inputs),
    )
    r = await run_lease(executor, lease)
    out = json.loads(r.outputs_json)
    assert json.loads(out["stdin"]) == inputs
    assert out["env"] == out["stdin"] == out["file"]


async def test_large_inputs_leave_plait_inputs_empty(executor: ExecExecutor) -> None:
    big = {"blob": "x" * (100 * 1024)}
    lease = exec_lease(
        py("""
        import json, os, sys
        data = sys.stdin.read()
        out = {"stdin_len": len(data), "env": os.environ["PLAIT_INPUTS"],
               "file_len": len(open(os.environ["PLAIT_INPUTS_FILE"]).read())}
        json.dump(out, open(os.environ["PLAIT_OUTPUT"], "w"))
        """),
        static_input=big,
    )
    r = await run_lease(executor, lease)
    out = json.loads(r.outputs_json)
    assert out["env"] == ""
    assert out["stdin_len"] == out["file_len"] > 100 * 1024


async def test_child_that_ignores_stdin_is_fine(executor: ExecExecutor) -> None:
    lease = exec_lease(["/bin/true"], static_input={"blob": "y" * (300 * 1024)})
    r = await run_lease(executor, lease)
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED


async def test_absent_output_file_means_empty_object(executor: ExecExecutor) -> None:
    r = await run_lease(executor, exec_lease(["/bin/true"]))
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED
    assert r.outputs_json == "{}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, not an array"),
        ('"text"', "must hold a JSON object, not a string"),
        ("BIG", "over the 1048576-byte limit"),
    ],
)
async def test_bad_outputs_fail_clearly(executor: ExecExecutor, content: str, message: str) -> None:
    if content == "BIG":
        content = '{"big": "' + "z" * (1 << 20) + '"}'
    lease = exec_lease(
        py("""
        import os, sys
        open(os.environ["PLAIT_OUTPUT"], "w").write(sys.stdin.read())
        """),
        inputs_json=content,
    )
    r = await run_lease(executor, lease)
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert message in r.error
    assert "$PLAIT_OUTPUT" in r.error
    assert r.error_code == Code.INVALID_ARGUMENT


def test_read_outputs_edge_cases(tmp_path: Path) -> None:
    f = tmp_path / "o.json"
    assert read_outputs(str(f), 100) == ("{}", "")
    f.write_text("  \n")
    assert read_outputs(str(f), 100) == ("{}", "")
    f.write_text('{"a": [1, 2]}')
    assert read_outputs(str(f), 100) == ('{"a":[1,2]}', "")
    f.write_text("null")
    assert "not null" in read_outputs(str(f), 100)[1]


async def test_temp_dir_is_fresh_and_removed(executor: ExecExecutor) -> None:
    code = """
        import json, os
        tmp = os.environ["TMPDIR"]
        listing = sorted(os.listdir(tmp))
        open(os.path.join(tmp, "scratch.bin"), "wb").write(b"x" * 1000)
        json.dump({"tmp": tmp, "listing": listing}, open(os.environ["PLAIT_OUTPUT"], "w"))
        """
    first = json.loads((await run_lease(executor, exec_lease(py(code)))).outputs_json)
    second = json.loads(
        (await run_lease(executor, exec_lease(py(code), lease_id="lease-2"))).outputs_json
    )
    assert first["tmp"] != second["tmp"]
    assert first["listing"] == ["plait-inputs.json"]
    assert not os.path.exists(first["tmp"])
    assert not os.path.exists(second["tmp"])


async def test_relative_paths_land_in_the_temp_dir(
    executor: ExecExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "workerd-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = """
        import json, os
        with open("result.txt", "w") as f:
            f.write("written relative")
        tmp = os.environ["TMPDIR"]
        out = {"cwd": os.getcwd(), "tmp": tmp, "listing": sorted(os.listdir(tmp))}
        json.dump(out, open(os.environ["PLAIT_OUTPUT"], "w"))
        """
    r = await run_lease(executor, exec_lease(py(code)))
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED, r
    out = json.loads(r.outputs_json)
    assert os.path.realpath(out["cwd"]) == os.path.realpath(out["tmp"])
    assert "result.txt" in out["listing"]
    assert not (elsewhere / "result.txt").exists()
    assert not os.path.exists(out["tmp"])  # removed with the temp dir


async def test_a_relative_program_is_looked_up_in_the_temp_dir(
    executor: ExecExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    r = await run_lease(executor, exec_lease(["./tool.sh"]))
    assert r.exit_code == 127, r
    assert "no such file" in r.error


async def test_tails_are_bounded_and_a_chatty_child_never_blocks(tmp_path: Path) -> None:
    ex = ExecExecutor(tmp_root=str(tmp_path), tail_bytes=1024)
    try:
        lease = exec_lease(
            py("""
            import sys
            chunk = "a" * 65536
            for _ in range(80):  # 5 MiB each way, far beyond any pipe buffer
                sys.stdout.write(chunk)
                sys.stderr.write(chunk)
            sys.stdout.write("END-OUT")
            sys.stderr.write("END-ERR")
            """)
        )
        r = await run_lease(ex, lease)
    finally:
        await ex.aclose()
    assert r.outcome == pb.ACTION_OUTCOME_SUCCEEDED
    assert len(r.stdout_tail) == 1024 and r.stdout_tail.endswith("END-OUT")
    assert len(r.stderr_tail) == 1024 and r.stderr_tail.endswith("END-ERR")


async def test_default_tails_are_64_kib(executor: ExecExecutor) -> None:
    lease = exec_lease(py("import sys; sys.stdout.write('b' * 200000)"))
    r = await run_lease(executor, lease)
    assert len(r.stdout_tail) == 64 * 1024


async def test_non_zero_exit_fails_with_code(executor: ExecExecutor) -> None:
    r = await run_lease(executor, exec_lease(["/bin/sh", "-c", "echo oops >&2; exit 3"]))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert r.exit_code == 3
    assert r.error == "exit code 3"
    assert r.stderr_tail == "oops\n"


async def test_death_by_signal_is_minus_n(executor: ExecExecutor) -> None:
    r = await run_lease(executor, exec_lease(["/bin/sh", "-c", "kill -9 $$"]))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert r.exit_code == -9
    assert "SIGKILL" in r.error


async def test_missing_program(executor: ExecExecutor) -> None:
    r = await run_lease(executor, exec_lease(["/nonexistent/program"]))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert r.exit_code == 127
    assert "/nonexistent/program" in r.error


async def test_argv_templates_and_shell(executor: ExecExecutor) -> None:
    lease = exec_lease(
        [
            *py("""
            import json, os, sys
            json.dump({"argv": sys.argv[1:]}, open(os.environ["PLAIT_OUTPUT"], "w"))
            """),
            "{{ input.name }}",
            "n={{input.n}}",
            "{{ input.deep.list.1 }}",
            "{{ input.obj }}",
        ],
        static_input={"name": "Ada", "n": 3, "deep": {"list": ["a", "b"]}, "obj": {"x": 1}},
    )
    r = await run_lease(executor, lease)
    assert json.loads(r.outputs_json) == {"argv": ["Ada", "n=3", "b", '{"x":1}']}

    shell = exec_lease(
        [
            'printf \'{"who": "%s", "arg": "%s"}\' "$PLAIT_ACTION_ID" "$1" > "$PLAIT_OUTPUT"',
            "sh",
            "A1",
        ],
        shell=True,
        lease_id="lease-2",
    )
    r = await run_lease(executor, shell)
    assert json.loads(r.outputs_json) == {"who": "act", "arg": "A1"}


async def test_item_templates_and_plait_item(executor: ExecExecutor) -> None:
    script = py("""
        import json, os, sys
        out = {"argv": sys.argv[1:], "env": os.environ.get("PLAIT_ITEM")}
        json.dump(out, open(os.environ["PLAIT_OUTPUT"], "w"))
        """)
    inputs = {"input": {"mode": "fast"}, "item": {"name": "b.txt", "size": 3}, "needs": {}}
    lease = exec_lease(
        [*script, "{{ item }}", "{{ item.name }}", "--size={{item.size}}", "{{ input.mode }}"],
        inputs_json=json.dumps(inputs),
    )
    r = await run_lease(executor, lease)
    out = json.loads(r.outputs_json)
    assert out["argv"] == ['{"name":"b.txt","size":3}', "b.txt", "--size=3", "fast"]
    assert json.loads(out["env"]) == {"name": "b.txt", "size": 3}

    # A string item goes in as it is; $PLAIT_ITEM holds it as JSON.
    inputs = {"input": None, "item": "a b", "needs": {}}
    lease = exec_lease([*script, "{{ item }}"], inputs_json=json.dumps(inputs), lease_id="l2")
    out = json.loads((await run_lease(executor, lease)).outputs_json)
    assert out == {"argv": ["a b"], "env": '"a b"'}

    # Not a map child: no $PLAIT_ITEM, and {{ item }} fails the attempt naming it.
    out = json.loads((await run_lease(executor, exec_lease(script, lease_id="l3"))).outputs_json)
    assert out == {"argv": [], "env": None}
    r = await run_lease(executor, exec_lease(["echo", "{{ item }}"], lease_id="l4"))
    assert r.outcome == pb.ACTION_OUTCOME_FAILED and r.error_code == Code.INVALID_ARGUMENT
    assert "exec.argv[1]" in r.error and "no item" in r.error
    inputs = {"input": None, "item": {"name": "x"}, "needs": {}}
    r = await run_lease(
        executor,
        exec_lease(["echo", "{{ item.size }}"], inputs_json=json.dumps(inputs), lease_id="l5"),
    )
    assert r.outcome == pb.ACTION_OUTCOME_FAILED and "the item has no item.size" in r.error


async def test_missing_template_key_fails_naming_it(executor: ExecExecutor) -> None:
    r = await run_lease(
        executor, exec_lease(["echo", "{{ input.missing }}"], static_input={"other": 1})
    )
    assert r.outcome == pb.ACTION_OUTCOME_FAILED
    assert "exec.argv[1]" in r.error and "input.missing" in r.error
