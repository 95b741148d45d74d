"""deploy/ read as the daemons see it: every command line and ``PLAIT_*`` variable it hands them.

Readers for the files under deploy/ — systemd units, Containerfiles, shell blocks and inline
commands in the Markdown, ``*.env`` files, Kubernetes YAML, TOML — that find every invocation
of ``plait-coordinator``, ``plait-workerd``, ``plait coordinator|workerd`` and the ``plait``
CLI, and every ``PLAIT_*`` variable set for them. Nothing here knows which files exist: they
are found by kind, so a new unit, manifest or README block is read as soon as it is added.
tests/deploy_flags.py holds what is found to the daemons.

Used by tests/unit/test_deploy_flags.py, test_deploy_systemd.py and test_containerfile.py, and
tests/system/test_container_install.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
INSTALL_SH = "deploy/container/install.sh"  # the image's install steps, which CI runs

COORDINATOR, WORKERD, CLI = "coordinator", "workerd", "plait"
# Console scripts (pyproject.toml [project.scripts]) and ``python -m`` modules, by program.
_SCRIPTS = {"plait": CLI, "plait-coordinator": COORDINATOR, "plait-workerd": WORKERD}
_MODULES = {"plait.coordinator": COORDINATOR, "plait.workerd": WORKERD, "plait.cli": CLI}
# Words after which the next word is the program a shell line runs (`runuser -u x -- plait`).
_LAUNCHERS = {"--", "exec", "sudo", "env", "nohup", "command", "time"}
_WRAPPERS = {"runuser", "sudo", "env", "exec", "nohup", "command", "time", "setpriv"}
_ENGINES = {"podman", "docker", "nerdctl"}
# Plait's image as `podman run` names it: plait, plait:TAG, registry/.../plait[:TAG][@DIGEST].
_IMAGE = re.compile(r"([\w.-]+(:[0-9]+)?/)?([\w.-]+/)*plait(:[\w.-]+)?(@sha256:[0-9a-f]+)?")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
_OPERATORS = {";", "&&", "||", "|", "&", ";;"}
_REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|"}
# A PLAIT_ name in text; not a prefix such as PLAIT_TLS_* or PLAIT_<KEY>.
_PLAIT_MENTION = re.compile(r"\bPLAIT_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*<])")


@dataclass(frozen=True, slots=True)
class Invocation:
    """One command line deploy/ runs: ``program`` is coordinator, workerd or plait (the CLI)."""

    where: str
    program: str
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EnvSetting:
    """A ``PLAIT_*`` variable deploy/ sets; ``program`` None: for any of them."""

    where: str
    program: str | None
    name: str


def rel(path: Path) -> str:
    """``path`` relative to the repository, for messages."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ----- systemd units ----------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values...]}}``, continuation lines joined, comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path}: ends in a continuation"
    return sections


def _unit_invocations(path: Path) -> Iterator[Invocation]:
    for section in read_unit(path).values():
        for key, values in section.items():
            if key.startswith("Exec"):
                for value in values:
                    words = shlex.split(value)
                    words[0] = words[0].lstrip("@-:+!")  # systemd's prefixes
                    yield from find_invocations(words, f"{rel(path)} {key}")


# ----- the Containerfile ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction: its keyword in upper case and the rest, continuations joined."""

    line: int
    keyword: str
    value: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form RUN/CMD/ENTRYPOINT, or None for shell form."""
        try:
            argv = json.loads(self.value)
        except ValueError:
            return None
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            return argv
        return None

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``COPY --from=builder a b`` -> ({"from": "builder"}, ["a", "b"])."""
        words = shlex.split(self.value)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass(slots=True)
class Stage:
    """A ``FROM`` and what follows it up to the next."""

    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        """This stage's instructions with ``keyword``."""
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(first line number, text): comments dropped, backslash continuations joined."""
    start, parts = 0, []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue  # a comment line may sit inside a continuation too
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        yield start, " ".join(p for p in parts if p)
        parts = []
    assert not parts, f"{path}: ends in a continuation"


def read_containerfile(path: Path = CONTAINERFILE) -> list[Stage]:
    """The stages, with ``ARG``s declared before the first ``FROM`` substituted in it."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in _logical_lines(path):
        keyword, _, value = text.partition(" ")
        instruction = Instruction(number, keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            flags, words = instruction.flags_and_words()
            base = re.sub(
                r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), ""), words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path}:{number}: FROM {value}"
            stages.append(Stage(base, name, []))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path}:{number}: {keyword} before FROM"
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return stages


def env_names(instruction: Instruction) -> list[str]:
    """The variables an ``ENV`` sets (``ENV A=1 B=2`` or the old ``ENV A 1``)."""
    words = shlex.split(instruction.value)
    if words and "=" not in words[0]:
        return [words[0]]
    return [w.partition("=")[0] for w in words]


def image_command(stages: list[Stage]) -> tuple[list[str], list[str]]:
    """The final stage's exec-form ENTRYPOINT and CMD (the last of each; [] when absent)."""
    out = []
    for keyword in ("ENTRYPOINT", "CMD"):
        found = stages[-1].all(keyword)
        argv = found[-1].exec_form() if found else []
        assert argv is not None, f"{keyword} {found[-1].value} is not in exec form"
        out.append(argv)
    return out[0], out[1]


def install_runs(stages: list[Stage]) -> list[tuple[Stage, Instruction, list[str]]]:
    """(stage, RUN, install.sh's arguments) of every RUN that invokes install.sh."""
    found = []
    for stage in stages:
        for run in stage.all("RUN"):
            for words in simple_commands(run.value):
                n = 0
                while n < len(words) and _ASSIGNMENT.fullmatch(words[n]):
                    n += 1  # PYTHON=... before the script
                if words[n:] and words[n].endswith(INSTALL_SH):
                    found.append((stage, run, words[n + 1 :]))
    return found


def _containerfiles(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name.startswith(("Containerfile", "Dockerfile"))
    )


def _containerfile_invocations(path: Path) -> Iterator[Invocation]:
    stages = read_containerfile(path)
    entrypoint, cmd = image_command(stages)
    yield from find_invocations(entrypoint + cmd, f"{rel(path)} ENTRYPOINT+CMD")
    for stage in stages:
        for run in stage.all("RUN"):
            argv = run.exec_form()
            where = f"{rel(path)}:{run.line} RUN"
            if argv is not None:
                yield from find_invocations(argv, where)
            else:
                yield from script_invocations(run.value, where)


# ----- shell ------------------------------------------------------------------------------------


def simple_commands(script: str) -> Iterator[list[str]]:
    """The words of each simple command in a shell script: continuations joined, comments,
    redirections and their targets dropped, split at ``;``, ``&&``, ``||``, ``|`` and ``&``.
    Enough for the one-line commands of deploy/'s README blocks and ``sh -c`` strings."""
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: not shell (a config snippet)
            tokens = line.split()
        words: list[str] = []
        skip = False
        for token in tokens:
            if skip:
                skip = False
            elif token in _OPERATORS:
                if words:
                    yield words
                words = []
            elif token in _REDIRECTS:
                skip = True
            else:
                words.append(token)
        if words:
            yield words


def find_invocations(words: list[str], where: str) -> Iterator[Invocation]:
    """The Plait program ``words`` runs, if it runs one: as the command word, after ``env``,
    ``sudo``, ``exec`` or a ``--`` (``runuser -u plait -- /opt/plait/bin/plait ...``), or as
    ``python -m plait.coordinator``. ``plait coordinator|workerd`` is the daemon itself."""
    for j, word in enumerate(words):
        k = j - 1
        while k >= 0 and _ASSIGNMENT.fullmatch(words[k]):
            k -= 1
        if _ASSIGNMENT.fullmatch(word) or (k >= 0 and words[k] not in _LAUNCHERS):
            continue
        name = os.path.basename(word)
        if name in _WRAPPERS:
            continue  # the program it runs comes later: after its options, or after --
        if name in _ENGINES and words[j + 1 : j + 2] in (["run"], ["create"]):
            # `podman run [options] plait:dev workerd ...`: the image's ENTRYPOINT is plait.
            image = next((n for n in range(j + 2, len(words)) if _IMAGE.fullmatch(words[n])), None)
            if image is not None and words[image + 1 :]:
                yield from find_invocations(["plait", *words[image + 1 :]], where)
            return
        if name in _SCRIPTS:
            program, argv = _SCRIPTS[name], words[j + 1 :]
        elif re.fullmatch(r"python[0-9.]*", name) and words[j + 1 : j + 2] == ["-m"]:
            module = words[j + 2] if len(words) > j + 2 else ""
            if module not in _MODULES:
                return
            program, argv = _MODULES[module], words[j + 3 :]
        else:
            return
        if program == CLI and argv[:1] in (["coordinator"], ["workerd"]):
            program, argv = argv[0], argv[1:]
        yield Invocation(where, program, tuple(argv))
        return


def script_invocations(script: str, where: str) -> Iterator[Invocation]:
    """Every Plait invocation in a shell script."""
    for words in simple_commands(script):
        yield from find_invocations(words, where)


def markdown_code_blocks(path: Path) -> Iterator[tuple[int, str]]:
    """(line of the opening fence, text) of each fenced code block."""
    start, fence, lines = 0, "", []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not fence:
            found = re.match(r"(```+|~~~+)", stripped)
            if found:
                start, fence, lines = number, found.group(1), []
        elif stripped.startswith(fence):
            yield start, "\n".join(lines)
            fence = ""
        else:
            lines.append(line)


def _markdown_invocations(path: Path) -> Iterator[Invocation]:
    blocks = list(markdown_code_blocks(path))
    for line, text in blocks:
        yield from script_invocations(text, f"{rel(path)}:{line} (code block)")
    # `plait certs worker --days 30` in prose: inline code outside the blocks.
    inside = {n for line, text in blocks for n in range(line, line + text.count("\n") + 2)}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if number not in inside:
            for span in re.findall(r"`([^`]+)`", line):
                where = f"{rel(path)}:{number} (inline code)"
                # A bare name (`plait-coordinator`, the user) is no command line.
                yield from (i for i in script_invocations(span, where) if i.argv)


# ----- Kubernetes -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Container:
    """One container of a Kubernetes object, and the Plait program it runs (None: not Plait)."""

    where: str
    spec: Mapping[str, Any]
    invocations: tuple[Invocation, ...]

    @property
    def program(self) -> str | None:
        """The program it runs; for a patch without command or args (a kustomize overlay's
        ``env:``), the one its name says (``coordinator``, ``workerd``)."""
        programs = {i.program for i in self.invocations}
        if not self.invocations and not self.spec.get("command") and not self.spec.get("args"):
            return _program_of_name(str(self.spec.get("name", "")))
        return programs.pop() if len(programs) == 1 else None


def yaml_documents(root: Path) -> Iterator[tuple[Path, Any]]:
    """Every YAML document under ``root`` (``*.yaml``, ``*.yml``)."""
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            raise AssertionError(f"{rel(path)} is not YAML: {e}") from None
        for doc in docs:
            if doc is not None:
                yield path, doc


def _pod_specs(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every mapping with a ``containers`` list, at any depth (Pod, Deployment, CronJob ...)."""
    if isinstance(node, Mapping):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from _pod_specs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pod_specs(item)


def _container_invocations(
    spec: Mapping[str, Any], where: str, entrypoint: list[str]
) -> Iterator[Invocation]:
    command = [str(w) for w in spec.get("command") or []]
    args = [str(w) for w in spec.get("args") or []]
    # No command: the image's ENTRYPOINT, ours when it is Plait's image or args name a daemon.
    ours = args[:1] in (["coordinator"], ["workerd"]) or "plait" in str(spec.get("image", ""))
    if not command and ours:
        command = entrypoint
    argv = command + args
    if argv and re.fullmatch(r"(ba|da)?sh", os.path.basename(argv[0])) and "-c" in argv:
        script = argv[argv.index("-c") + 1] if argv.index("-c") + 1 < len(argv) else ""
        yield from script_invocations(script, where)
    else:
        yield from find_invocations(argv, where)


def kubernetes_containers(root: Path, entrypoint: list[str]) -> Iterator[Container]:
    """Every container (and init container) in the YAML under ``root``."""
    for path, doc in yaml_documents(root):
        if not isinstance(doc, Mapping):
            continue
        obj = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
        for pod in _pod_specs(doc):
            for key in ("initContainers", "containers", "ephemeralContainers"):
                for spec in pod.get(key) or []:
                    where = f"{rel(path)}: {obj} {key} {spec.get('name', '?')}"
                    found = tuple(_container_invocations(spec, where, entrypoint))
                    yield Container(where, spec, found)


def config_maps(root: Path) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """``{name: (where, data)}`` of every ConfigMap under ``root``."""
    out = {}
    for path, doc in yaml_documents(root):
        if isinstance(doc, Mapping) and doc.get("kind") == "ConfigMap":
            name = (doc.get("metadata") or {}).get("name", "?")
            out[name] = (f"{rel(path)}: ConfigMap/{name}", doc.get("data") or {})
    return out


# ----- everything under deploy/ -----------------------------------------------------------------


def _entrypoint(root: Path) -> list[str]:
    files = _containerfiles(root)
    return image_command(read_containerfile(files[0]))[0] if files else ["plait"]


def deploy_invocations(root: Path = DEPLOY) -> list[Invocation]:
    """Every Plait command line under ``root``: units' ``Exec*=``, Containerfiles' ENTRYPOINT
    and CMD (and RUN), shell code blocks in Markdown, Kubernetes containers' command/args."""
    found: list[Invocation] = []
    for unit in sorted(root.rglob("*.service")):
        found += _unit_invocations(unit)
    for path in _containerfiles(root):
        found += _containerfile_invocations(path)
    for doc in sorted(root.rglob("*.md")):
        found += _markdown_invocations(doc)
    for container in kubernetes_containers(root, _entrypoint(root)):
        found += container.invocations
    return found


def _program_of_name(name: str) -> str | None:
    """``coordinator.env`` is the coordinator's, ``workerd.env`` the worker's."""
    name = name.lower()
    if "coordinator" in name:
        return COORDINATOR
    if "workerd" in name or "worker" in name:
        return WORKERD
    return None


def deploy_env_settings(root: Path = DEPLOY) -> list[EnvSetting]:
    """Every ``PLAIT_*`` variable set under ``root``, and for which program: ``*.env`` files
    (commented-out suggestions too), units' ``Environment=``, Containerfile ``ENV``s,
    Kubernetes ``env:`` names and the keys of ConfigMaps containers take with ``envFrom``."""
    found = [s for s in _env_file_settings(root) if s.name.startswith("PLAIT_")]
    found += [s for s in _unit_env_settings(root) if s.name.startswith("PLAIT_")]
    for path in _containerfiles(root):
        for stage in read_containerfile(path):
            for env in stage.all("ENV"):
                where = f"{rel(path)}:{env.line} ENV"
                found += [
                    EnvSetting(where, None, n) for n in env_names(env) if n.startswith("PLAIT_")
                ]
    found += [s for s in _kubernetes_env_settings(root) if s.name.startswith("PLAIT_")]
    return found


def _env_file_settings(root: Path) -> Iterator[EnvSetting]:
    for path in sorted(root.rglob("*.env")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"#?\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", line.strip())
            if m:
                yield EnvSetting(f"{rel(path)}:{number}", _program_of_name(path.name), m.group(1))


def _unit_env_settings(root: Path) -> Iterator[EnvSetting]:
    for unit in sorted(root.rglob("*.service")):
        programs = {i.program for i in _unit_invocations(unit)} - {CLI}
        program = programs.pop() if len(programs) == 1 else None
        for value in read_unit(unit).get("Service", {}).get("Environment", []):
            for word in shlex.split(value):
                yield EnvSetting(f"{rel(unit)} Environment=", program, word.partition("=")[0])


def _kubernetes_env_settings(root: Path) -> Iterator[EnvSetting]:
    maps = config_maps(root)
    for container in kubernetes_containers(root, _entrypoint(root)):
        program = container.program
        for item in container.spec.get("env") or []:
            yield EnvSetting(f"{container.where} env", program, str(item.get("name", "")))
        for source in container.spec.get("envFrom") or []:
            ref = (source.get("configMapRef") or {}).get("name")
            if ref in maps:
                where, data = maps[ref]
                prefix = str(source.get("prefix", ""))
                for key in data:
                    yield EnvSetting(f"{where} (envFrom {container.where})", program, prefix + key)


def plait_mentions(root: Path = DEPLOY) -> list[EnvSetting]:
    """Every ``PLAIT_*`` name written anywhere in a text file under ``root`` (prose too)."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for m in _PLAIT_MENTION.finditer(line):
                found.append(EnvSetting(f"{rel(path)}:{number}", None, m.group(0)))
    return found


def deploy_toml_keys(root: Path = DEPLOY) -> list[tuple[str, str]]:
    """(where, key) of every coordinator setting in the TOML under ``root`` (``*.toml`` files
    and ConfigMap entries named ``*.toml``), commented-out ``# key = value`` lines too."""
    texts = [(rel(p), p.read_text()) for p in sorted(root.rglob("*.toml"))]
    for where, data in config_maps(root).values():
        texts += [(f"{where} {k}", str(v)) for k, v in data.items() if str(k).endswith(".toml")]
    found = []
    for where, text in texts:
        table = tomllib.loads(text)
        section = table.get("coordinator", table)
        found += [(where, str(key)) for key in section]
        for number, line in enumerate(text.splitlines(), 1):
            m = re.match(r"#\s*([a-z][a-z0-9_-]*)\s*=\s*\S", line.strip())
            if m:
                found.append((f"{where}:{number} (commented out)", m.group(1)))
    return found
