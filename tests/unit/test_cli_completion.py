"""``plait completion bash|zsh|fish``: scripts generated from the parser (plait.cli.completion).

bash really completes: the script is sourced into a bash process, ``COMP_WORDS`` and
``COMP_CWORD`` are set as readline would, and the completion function's ``COMPREPLY`` is read
back. The zsh and fish scripts are syntax-checked by those shells when they are installed, and
fish (which can answer ``complete -C``) completes a command line too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from plait.cli.completion import commands, script
from plait.cli.main import build_parser, main


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("completion")
    paths = {}
    for shell in ("bash", "zsh", "fish"):
        path = out / f"plait.{shell}"
        path.write_text(script(shell, build_parser()))
        paths[shell] = path
    return paths


def bash_complete(script_path: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = "\n".join(
        [
            f"source {shlex.quote(str(script_path))}",
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
            f"COMP_CWORD={len(words) - 1}",
            f"COMP_LINE={shlex.quote(line)}",
            "_plait",
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ]
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=True,
    )
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completes_commands_subcommands_flags_and_choices(
    scripts: dict[str, Path], tmp_path: Path
) -> None:
    bash = scripts["bash"]
    top = bash_complete(bash, "plait ")
    assert {"run", "submit", "validate", "graph", "config", "completion", "certs"} <= set(top)
    assert bash_complete(bash, "plait su") == ["submit"]
    assert bash_complete(bash, "plait va") == ["validate"]
    assert bash_complete(bash, "plait certs i") == ["init"]
    assert bash_complete(bash, "plait config u") == ["use-context"]
    assert bash_complete(bash, "plait submit -o ") == ["table", "json"]
    assert bash_complete(bash, "plait graph x --format m") == ["mermaid"]
    assert bash_complete(bash, "plait completion ") == ["bash", "zsh", "fish"]
    # A flag's value is not taken for a command: `status` is still a subcommand of plait.
    assert bash_complete(bash, "plait --coordinator 10.0.0.1:7450 sta") == ["status"]
    flags = bash_complete(bash, "plait submit --")
    assert {"--wait", "--watch", "--param", "--input-file", "--context", "--help"} <= set(flags)
    # Workflow files and file-valued flags complete file names.
    (tmp_path / "flow.yaml").write_text("x")
    (tmp_path / "values.json").write_text("{}")
    assert bash_complete(bash, "plait validate fl", cwd=tmp_path) == ["flow.yaml"]
    assert bash_complete(bash, "plait submit flow.yaml --input-file v", cwd=tmp_path) == [
        "values.json"
    ]
    assert bash_complete(bash, "plait tokens list --file fl", cwd=tmp_path) == ["flow.yaml"]


def test_bash_registers_the_function(scripts: dict[str, Path]) -> None:
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {scripts['bash']}; complete -p plait"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "complete -F _plait plait"


def require(shell: str) -> None:
    """Skips without ``shell`` (fails under CI, whose .ci/run installs it)."""
    if shutil.which(shell) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{shell} is not installed; .ci/run must install it")
        pytest.skip(f"{shell} is not installed")


# zsh's completion builtins exist only inside its completion system; these stand-ins print what
# the script hands them (_describe filters by the prefix itself, so all candidates are given).
ZSH_STUBS = """
compdef() { :; }
_describe() { local name=${@[-1]}; print -l -- ${(P)name}; }
compadd() { [[ $1 == -- ]] && shift; print -l -- "$@"; }
_files() { print -- '<files>'; }
"""


def zsh_complete(script_path: Path, *words: str) -> list[str]:
    program = "\n".join(
        [
            ZSH_STUBS,
            f"source {shlex.quote(str(script_path))}",
            f"words=({' '.join(shlex.quote(w) for w in words)})",
            f"CURRENT={len(words)}",
            "_plait",
        ]
    )
    done = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.splitlines()


def test_the_zsh_script_parses_and_completes(scripts: dict[str, Path]) -> None:
    require("zsh")
    done = subprocess.run(
        ["zsh", "-n", str(scripts["zsh"])], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert scripts["zsh"].read_text().startswith("#compdef plait\n")
    zsh = scripts["zsh"]
    top = zsh_complete(zsh, "plait", "")
    assert "submit:submit a workflow file" in top and any(x.startswith("graph:") for x in top)
    assert [x.split(":")[0] for x in zsh_complete(zsh, "plait", "certs", "i")] == [
        "init",
        "worker",
        "client",
        "coordinator",
        "show",
    ]
    assert "status:show a workflow and its actions" in zsh_complete(
        zsh, "plait", "--coordinator", "10.0.0.1:7450", "sta"
    )
    assert zsh_complete(zsh, "plait", "submit", "-o", "") == ["table", "json"]
    assert zsh_complete(zsh, "plait", "validate", "") == ["<files>"]
    assert "--input-file" in zsh_complete(zsh, "plait", "submit", "--i")


def test_the_fish_script_parses_and_completes(scripts: dict[str, Path]) -> None:
    require("fish")
    fish = str(scripts["fish"])
    done = subprocess.run(
        ["fish", "--no-execute", fish], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr

    def complete(line: str) -> list[str]:
        program = f"source {shlex.quote(fish)}; complete -C {shlex.quote(line)}"
        out = subprocess.run(
            ["fish", "--no-config", "-c", program],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [row.split("\t")[0] for row in out.splitlines()]

    assert complete("plait su") == ["submit"]
    assert complete("plait certs i") == ["init"]
    assert set(complete("plait submit -o ")) == {"table", "json"}
    assert "--input-file" in complete("plait submit --i")


def test_the_tables_cover_the_parser() -> None:
    found = {c.key: c for c in commands(build_parser())}
    assert "tokens create" in found and "config use-context" in found
    submit = found["submit"]
    assert submit.files and not submit.subcommands
    output = next(o for o in submit.options if "--output" in o.flags)
    assert output.takes_value and output.choices == ("table", "json")
    wait = next(o for o in submit.options if "--wait" in o.flags)
    assert not wait.takes_value


def test_the_command_prints_a_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    assert "complete -F _plait plait" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["completion", "tcsh"])
    assert exit_info.value.code == 2
