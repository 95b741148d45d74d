"""``plait completion bash|zsh|fish``: shell completion scripts made from the parser (CLI layer).

The scripts are generated from :func:`plait.cli.main.build_parser`, so they know every command,
subcommand (``plait certs init``), flag, and the fixed choices of a flag (``-o table|json``);
flags that take a file, and workflow-file arguments, complete file names. Nothing runs Python
when you press TAB: each script holds the tables it needs, as shell functions, and the same
small walk over the words typed so far finds the command being completed.

Install::

    plait completion bash > ~/.local/share/bash-completion/completions/plait
    plait completion zsh > "${fpath[1]}/_plait"        # or any directory in $fpath
    plait completion fish > ~/.config/fish/completions/plait.fish
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["SHELLS", "Command", "add_parser", "commands", "script"]

EXIT_OK = 0
SHELLS = ("bash", "zsh", "fish")
# A metavar or positional that names a file: these complete file names.
_FILE_METAVAR = re.compile(r"FILE|FLOW|DIR|PATH|\.yaml|\.toml|\.json", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Option:
    """One flag: its spellings, whether it takes a value, its fixed choices, its help."""

    flags: tuple[str, ...]
    takes_value: bool
    choices: tuple[str, ...] = ()
    files: bool = False
    help: str = ""


@dataclass(slots=True)
class Command:
    """One command path (``("certs", "init")``; ``()`` is ``plait`` itself)."""

    path: tuple[str, ...]
    options: list[Option] = field(default_factory=list)
    subcommands: dict[str, str] = field(default_factory=dict)  # name -> help
    files: bool = False  # a positional argument is a file
    choices: tuple[str, ...] = ()  # the fixed choices of a positional argument

    @property
    def key(self) -> str:
        """The path as the scripts spell it: words joined by spaces."""
        return " ".join(self.path)


def add_parser(sub: _SubParsers) -> None:
    """Registers ``plait completion``."""
    p = sub.add_parser(
        "completion",
        help="print a shell completion script for bash, zsh or fish",
        description="Print a completion script for SHELL, generated from plait's own parser"
        " (commands, subcommands, flags and their choices; file names where a file is"
        " expected). bash: `plait completion bash > ~/.local/share/bash-completion/completions/"
        'plait`; zsh: `plait completion zsh > "${fpath[1]}/_plait"`; fish: `plait completion'
        " fish > ~/.config/fish/completions/plait.fish`. Or, for this shell only: `source <(plait"
        " completion bash)`.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    """``plait completion SHELL``."""
    from plait.cli.main import build_parser

    sys.stdout.write(script(args.shell, build_parser()))
    return EXIT_OK


def _help(action: argparse.Action) -> str:
    text = action.help if isinstance(action.help, str) and action.help != argparse.SUPPRESS else ""
    return " ".join(text.replace("%(default)s", str(action.default)).split())


def _is_file(action: argparse.Action) -> bool:
    names = [str(action.metavar or ""), action.dest]
    return any(_FILE_METAVAR.search(n) for n in names if n)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every command path of ``parser``, depth first, each with its flags and subcommands."""
    command = Command(path)
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _help(a) for a in action._choices_actions}
            for name, child in action.choices.items():
                command.subcommands[name] = helps.get(name, "")
                children.append((name, child))
        elif action.option_strings:
            command.options.append(
                Option(
                    tuple(action.option_strings),
                    takes_value=action.nargs != 0,
                    choices=tuple(str(c) for c in action.choices or ()),
                    files=action.nargs != 0 and not action.choices and _is_file(action),
                    help=_help(action),
                )
            )
        elif action.choices:
            command.choices = tuple(str(c) for c in action.choices)
        elif action.nargs != argparse.REMAINDER and _is_file(action):
            command.files = True
        elif action.nargs == argparse.REMAINDER:
            command.files = True  # a daemon's own flags: at least offer files
    yield command
    for name, child in children:
        yield from commands(child, (*path, name))


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`)."""
    cmds = list(commands(parser))
    prog = parser.prog
    if shell == "bash":
        return _bash(prog, cmds)
    if shell == "zsh":
        return _zsh(prog, cmds)
    if shell == "fish":
        return _fish(prog, cmds)
    raise ValueError(f"no completion for shell {shell!r}; expected one of {', '.join(SHELLS)}")


# Shared by bash and zsh: the tables as `case` functions (POSIX-ish syntax both shells read) ----


def _sq(text: str) -> str:
    """``text`` single-quoted for sh, bash, zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _case(name: str, rows: list[tuple[str, str]], indent: str = "    ") -> list[str]:
    """``name() { case "$1" in 'key') printf '%s\\n' words;; esac; }``."""
    out = [f"{name}() {{", f'{indent}case "$1" in']
    for key, words in rows:
        if words:
            out.append(f"{indent}{indent}{_sq(key)}) printf '%s\\n' {_sq(words)} ;;")
    out += [f"{indent}esac", "}"]
    return out


def _tables(fn: str, cmds: list[Command]) -> list[str]:
    subs = [(c.key, " ".join(c.subcommands)) for c in cmds]
    flags = [(c.key, " ".join(f for o in c.options for f in o.flags)) for c in cmds]
    valued = [
        (c.key, " ".join(f for o in c.options if o.takes_value for f in o.flags)) for c in cmds
    ]
    filed = [(c.key, " ".join(f for o in c.options if o.files for f in o.flags)) for c in cmds]
    choices = [
        (f"{c.key}|{f}", " ".join(o.choices)) for c in cmds for o in c.options for f in o.flags
    ]
    positional = [(c.key, "yes" if c.files and not c.subcommands else "") for c in cmds]
    arg_choices = [(c.key, " ".join(c.choices)) for c in cmds]
    return [
        *_case(f"{fn}_subcommands", subs),
        *_case(f"{fn}_flags", flags),
        *_case(f"{fn}_value_flags", valued),
        *_case(f"{fn}_file_flags", filed),
        *_case(f"{fn}_choices", choices),
        *_case(f"{fn}_file_args", positional),
        *_case(f"{fn}_arg_choices", arg_choices),
    ]


# The walk: which command the words so far name (flag values are skipped, so `-o json` or
# `--coordinator a:1` before a command are not taken for one). Same in bash and zsh.
_WALK = """\
{fn}_path() {{
    local at="" w skip=0
    for w in "$@"; do
        if (( skip )); then skip=0; continue; fi
        case "$w" in
            -*=*) continue ;;
            -*) if {fn}_has "$({fn}_value_flags "$at")" "$w"; then skip=1; fi; continue ;;
        esac
        if {fn}_has "$({fn}_subcommands "$at")" "$w"; then at="${{at:+$at }}$w"; fi
    done
    printf '%s' "$at"
}}

{fn}_has() {{
    case " $1 " in *" $2 "*) return 0 ;; esac
    return 1
}}
"""


def _bash(prog: str, cmds: list[Command]) -> str:
    fn = "_" + re.sub(r"\W", "_", prog)
    body = f"""\
{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" at words
    (( COMP_CWORD > 1 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    at="$({fn}_path "${{COMP_WORDS[@]:1:COMP_CWORD-1}}")"
    COMPREPLY=()
    if [[ -n "$prev" && "$prev" == -* ]] && {fn}_has "$({fn}_value_flags "$at")" "$prev"; then
        words="$({fn}_choices "$at|$prev")"
        if [[ -n "$words" ]]; then
            COMPREPLY=( $(compgen -W "$words" -- "$cur") )
        elif {fn}_has "$({fn}_file_flags "$at")" "$prev"; then
            compopt -o filenames 2>/dev/null
            COMPREPLY=( $(compgen -f -- "$cur") )
        fi
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$({fn}_flags "$at")" -- "$cur") )
        return 0
    fi
    words="$({fn}_subcommands "$at")$({fn}_arg_choices "$at")"
    if [[ -n "$words" ]]; then
        COMPREPLY=( $(compgen -W "$words" -- "$cur") )
    elif [[ -n "$({fn}_file_args "$at")" ]]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=( $(compgen -f -- "$cur") )
    fi
    return 0
}}

complete -F {fn} {prog}
"""
    head = f"# bash completion for {prog} (generated by `{prog} completion bash`)\n"
    return "\n".join([head, *_tables(fn, cmds), "", _WALK.format(fn=fn), body])


def _zsh(prog: str, cmds: list[Command]) -> str:
    fn = "_" + re.sub(r"\W", "_", prog)
    described = []
    for c in cmds:
        items = " ".join(
            _sq(f"{name.replace(':', chr(92) + ':')}:{text}")
            for name, text in c.subcommands.items()
        )
        if items:
            described.append(f"        {_sq(c.key)}) described=( {items} ) ;;")
    body = f"""\
{fn}() {{
    local cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}" at choices
    local -a described
    at="$({fn}_path "${{(@)words[2,CURRENT-1]}}")"
    if [[ "$prev" == -* ]] && {fn}_has "$({fn}_value_flags "$at")" "$prev"; then
        choices="$({fn}_choices "$at|$prev")"
        if [[ -n "$choices" ]]; then
            compadd -- ${{=choices}}
        elif {fn}_has "$({fn}_file_flags "$at")" "$prev"; then
            _files
        fi
        return
    fi
    if [[ "$cur" == -* ]]; then
        compadd -- ${{=$({fn}_flags "$at")}}
        return
    fi
    case "$at" in
{chr(10).join(described)}
    esac
    choices="$({fn}_arg_choices "$at")"
    if (( ${{#described}} )); then
        _describe -t commands 'command' described
    elif [[ -n "$choices" ]]; then
        compadd -- ${{=choices}}
    elif [[ -n "$({fn}_file_args "$at")" ]]; then
        _files
    fi
}}

if [[ "$funcstack[1]" == "{fn}" ]]; then
    {fn} "$@"
else
    compdef {fn} {prog}
fi
"""
    head = f"#compdef {prog}\n# zsh completion for {prog} (generated by `{prog} completion zsh`)\n"
    return "\n".join([head, *_tables(fn, cmds), "", _WALK.format(fn=fn), body])


def _fish_q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(prog: str, cmds: list[Command]) -> str:
    fn = "__" + re.sub(r"\W", "_", prog)

    def switch(name: str, rows: list[tuple[str, str]]) -> list[str]:
        out = [f"function {name}", "    switch $argv[1]"]
        for key, words in rows:
            if words:
                out += [f"        case {_fish_q(key)}", f"            echo {_fish_q(words)}"]
        return [*out, "    end", "end", ""]

    out = [
        f"# fish completion for {prog} (generated by `{prog} completion fish`)",
        "",
        *switch(f"{fn}_subcommands", [(c.key, " ".join(c.subcommands)) for c in cmds]),
        *switch(
            f"{fn}_value_flags",
            [
                (c.key, " ".join(f for o in c.options if o.takes_value for f in o.flags))
                for c in cmds
            ],
        ),
        f"function {fn}_path",
        "    set -l path ''",
        "    set -l skip 0",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    for w in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        if string match -q -- '-*=*' $w",
        "            continue",
        "        else if string match -q -- '-*' $w",
        f"            if contains -- $w (string split ' ' -- ({fn}_value_flags $path))",
        "                set skip 1",
        "            end",
        "            continue",
        "        end",
        f"        if contains -- $w (string split ' ' -- ({fn}_subcommands $path))",
        '            set path (string trim -- "$path $w")',
        "        end",
        "    end",
        "    echo $path",
        "end",
        "",
        f"function {fn}_at",
        f"    set -l path ({fn}_path)",
        '    test "$path" = "$argv[1]"',
        "end",
        "",
        f"complete -c {prog} -f",
    ]
    for c in cmds:
        cond = f"-n {_fish_q(f'{fn}_at {_fish_q(c.key)}')}"
        for name, text in c.subcommands.items():
            out.append(f"complete -c {prog} {cond} -a {_fish_q(name)} -d {_fish_q(text)}")
        for o in c.options:
            spell = " ".join(
                f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}"
                for f in o.flags
                if f.startswith("--") or len(f) == 2
            )
            if not spell:
                continue
            value = ""
            if o.choices:
                value = f" -x -a {_fish_q(' '.join(o.choices))}"
            elif o.files:
                value = " -r -F"
            elif o.takes_value:
                value = " -x"
            out.append(f"complete -c {prog} {cond} {spell}{value} -d {_fish_q(o.help)}")
        if c.files and not c.subcommands:
            out.append(f"complete -c {prog} {cond} -F")
        if c.choices:
            out.append(f"complete -c {prog} {cond} -a {_fish_q(' '.join(c.choices))}")
    return "\n".join(out) + "\n"
