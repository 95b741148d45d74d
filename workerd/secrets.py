"""Secrets: the worker's allow-list, resolution per attempt, and redaction (workerd layer).

``workerd --secret NAME=file:PATH`` or ``--secret NAME=env:VAR`` allow-lists a secret; an exec
action names the ones it wants in ``ActionSpec.secrets`` (variable -> secret name) and gets
each value in its environment, and nowhere else:

* **Start-up** (:meth:`SecretStore.from_flags`): bad syntax, a name given twice, a file that
  cannot be read or a variable that is not set is a :class:`~plait.errors.ConfigError` naming
  the flag (exit 2). ``env:`` values are captured once, from workerd's own environment.
* **Each attempt** (:meth:`SecretStore.resolve`): files are read again (so a rotated file is
  used by the next attempt), off the event loop, with ``O_NOFOLLOW|O_NONBLOCK``; they must be
  regular files of at most :data:`~plait.exec_rules.MAX_SECRET_BYTES` of UTF-8 text without NUL
  (one trailing newline is dropped). A name the worker does not provide, or cannot read now,
  fails the attempt with ``FAILED_PRECONDITION`` (the coordinator does not retry it), naming
  the secret and never its value.
* **Reporting** (:class:`Redactor`): every resolved value is replaced by ``[redacted:NAME]`` in
  the stdout and stderr tails and the error message before the result leaves the worker; an
  attempt whose outputs hold a value fails instead (outputs are journalled and passed to other
  actions; silently altering them would corrupt data). Encodings of a value (base64, split,
  reversed) are not recognised: redaction stops accidents, not an action that means to leak.
  Live output (``plait logs -f``) goes through :meth:`Redactor.stream` the same way: each
  stream holds back the last bytes that could be the start of a value until the next read
  (or its end) shows whether it is one.

Values are never logged, never put in an exception message, and kept out of reprs.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from plait.errors import ConfigError
from plait.exec_rules import MAX_SECRET_BYTES, describe_env_var, redaction_marker
from plait.ids import describe_id
from plait.worker.executor import FAILED, AttemptResult, Code

__all__ = [
    "Redactor",
    "SecretError",
    "SecretSource",
    "SecretStore",
    "parse_secret_flag",
    "read_secret_file",
]

_FLAG = "--secret"


class SecretError(Exception):
    """A secret cannot be given to an attempt; the message names it, never its value."""

    def __init__(self, message: str, code: int = Code.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Where one allow-listed secret comes from: ``file:PATH`` or ``env:VAR``."""

    name: str
    kind: Literal["file", "env"]
    ref: str  # the file's path, or the variable of workerd's environment

    def __str__(self) -> str:
        return f"{self.name}={self.kind}:{self.ref}"


def parse_secret_flag(item: str) -> SecretSource:
    """``NAME=file:PATH`` or ``NAME=env:VAR`` (the ``--secret`` flag).

    Raises:
        ConfigError: naming ``--secret`` and what is wrong.
    """
    name, sep, source = item.partition("=")
    kind, colon, ref = source.partition(":")
    if not sep or not colon or kind not in ("file", "env") or not ref:
        raise ConfigError(f"{_FLAG}: expected NAME=file:PATH or NAME=env:VAR, got {item!r}")
    why = describe_id(name)
    if why:
        raise ConfigError(f"{_FLAG} {item}: the secret name {why}")
    if kind == "env" and ("=" in ref or "\0" in ref):
        raise ConfigError(f"{_FLAG} {item}: {ref!r} is not an environment variable name")
    return SecretSource(name, "file" if kind == "file" else "env", ref)


def _checked_value(data: bytes) -> str:
    """The secret as the action's environment will carry it (one trailing newline dropped)."""
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"is over the {MAX_SECRET_BYTES}-byte limit")
    if b"\0" in data:
        raise ValueError("contains a NUL byte, which an environment variable cannot carry")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # The exception's text would quote a byte of the secret: say only what is wrong.
        raise ValueError("is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_secret_file(path: str) -> str:
    """Reads one secret file now: a regular file (not a symlink, FIFO or device), size-capped.

    Blocking: call it off the event loop.

    Raises:
        ValueError: what is wrong, without any of the file's contents.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symlink
            raise ValueError(f"{path} is a symlink (point --secret at the file itself)") from None
        raise ValueError(f"{path}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > MAX_SECRET_BYTES:
            raise ValueError(
                f"{path} is {st.st_size} bytes, over the {MAX_SECRET_BYTES}-byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    try:
        return _checked_value(b"".join(chunks))
    except ValueError as err:
        raise ValueError(f"{path} {err}") from None


class SecretStore:
    """The secrets this worker provides (its allow-list) and how to read each.

    ``env:`` values are captured when the store is built (start-up); files are read again for
    every attempt. ``repr`` shows names and sources only.
    """

    def __init__(
        self, sources: Sequence[SecretSource] = (), environ: Mapping[str, str] | None = None
    ) -> None:
        self._sources: dict[str, SecretSource] = {}
        self._env_values: dict[str, str] = {}
        environ = os.environ if environ is None else environ
        for src in sources:
            if src.name in self._sources:
                raise ConfigError(
                    f"{_FLAG} {src}: secret {src.name!r} is already given as"
                    f" {self._sources[src.name]}"
                )
            self._sources[src.name] = src
            if src.kind == "env":
                self._env_values[src.name] = self._capture(src, environ)
            else:
                try:
                    read_secret_file(src.ref)  # refuse an unreadable file at start-up
                except ValueError as err:
                    raise ConfigError(f"{_FLAG} {src}: {err}") from None

    @staticmethod
    def _capture(src: SecretSource, environ: Mapping[str, str]) -> str:
        value = environ.get(src.ref)
        if value is None:
            raise ConfigError(f"{_FLAG} {src}: ${src.ref} is not set in workerd's environment")
        try:
            return _checked_value(value.encode("utf-8"))
        except (UnicodeEncodeError, ValueError) as err:
            why = err if isinstance(err, ValueError) else "is not UTF-8 text"
            raise ConfigError(f"{_FLAG} {src}: ${src.ref} {why}") from None

    @classmethod
    def from_flags(cls, items: Iterable[str], environ: Mapping[str, str]) -> SecretStore:
        """The store the ``--secret`` flags describe, checked now (ConfigError naming the flag)."""
        return cls([parse_secret_flag(item) for item in items], environ)

    @property
    def names(self) -> frozenset[str]:
        """The secrets this worker provides."""
        return frozenset(self._sources)

    def __repr__(self) -> str:
        return f"SecretStore({', '.join(str(s) for s in self._sources.values())})"

    def _read(self, wanted: Mapping[str, str]) -> dict[str, str]:
        """``{secret name: value}`` for ``wanted`` (variable -> name); blocking for files."""
        values: dict[str, str] = {}
        for var, name in wanted.items():
            why = describe_env_var(var)
            if why:  # the coordinator checked this at submit; a lease is not trusted blindly
                raise SecretError(f"secrets: variable {why}", Code.INVALID_ARGUMENT)
            src = self._sources.get(name)
            if src is None:
                raise SecretError(
                    f"secret {name!r} (for ${var}): this worker does not provide it"
                    f" (workerd {_FLAG} {name}=file:PATH|env:VAR)"
                )
            if name in values:
                continue
            if src.kind == "env":
                values[name] = self._env_values[name]
                continue
            try:
                values[name] = read_secret_file(src.ref)
            except ValueError as err:
                raise SecretError(
                    f"secret {name!r} (for ${var}): this worker cannot read it now: {err}"
                ) from None
        return values

    async def resolve(self, wanted: Mapping[str, str]) -> tuple[dict[str, str], Redactor]:
        """The environment entries for ``wanted`` (variable -> secret name), and their redactor.

        Files are read on a thread, never on the event loop.

        Raises:
            SecretError: a secret this worker does not provide or cannot read (its message
                names the secret and the variable, never a value).
        """
        if any(self._sources[n].kind == "file" for n in wanted.values() if n in self._sources):
            values = await asyncio.to_thread(self._read, wanted)
        else:
            values = self._read(wanted)
        env = {var: values[name] for var, name in wanted.items()}
        return env, Redactor(values)


class Redactor:
    """Replaces secret values by ``[redacted:NAME]`` in what an attempt reports."""

    def __init__(self, values: Mapping[str, str]) -> None:
        """``values``: secret name -> value. Empty values cannot be found, so are skipped."""
        # Each value as written, and as JSON writes it inside a string (when that differs).
        self._names: dict[str, str] = {}
        for name, value in values.items():
            if value:
                self._names.setdefault(value, name)
                self._names.setdefault(json.dumps(value)[1:-1], name)
        # Longest first: a secret that contains another is replaced whole.
        ordered = sorted(self._names, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None
        self.margin = max((len(v.encode()) for v in self._names), default=0)
        """Extra bytes to keep ahead of a tail, so its cut never splits a value."""

    def text(self, text: str) -> str:
        """``text`` with every value replaced by its marker."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: redaction_marker(self._names[m.group(0)]), text)

    def tail(self, text: str, limit: int) -> str:
        """A redacted tail of at most ``limit`` bytes (``text`` read with :attr:`margin` more)."""
        out = self.text(text)
        data = out.encode()
        if len(data) <= limit:
            return out
        return data[-limit:].decode("utf-8", "replace")

    def stream(self) -> StreamRedactor:
        """A redactor for one output stream read a piece at a time (live logs)."""
        return StreamRedactor(self._names, self.margin)

    def leaked_in(self, outputs_json: str) -> str | None:
        """The name of a secret whose value (as JSON writes it) is in ``outputs_json``."""
        if self._pattern is None:
            return None
        m = self._pattern.search(outputs_json)
        return self._names[m.group(0)] if m else None

    def result(self, result: AttemptResult, tail_bytes: int) -> AttemptResult:
        """``result`` as it may leave the worker: values redacted; leaked outputs fail it."""
        if self._pattern is None:
            return result
        out = replace(
            result,
            error=self.text(result.error),
            stdout_tail=self.tail(result.stdout_tail, tail_bytes),
            stderr_tail=self.tail(result.stderr_tail, tail_bytes),
        )
        leaked = self.leaked_in(result.outputs_json) if result.outputs_json else None
        if leaked is not None:
            out.outcome, out.outputs_json = FAILED, ""
            out.error_code = Code.INVALID_ARGUMENT
            out.error = (
                f"$PLAIT_OUTPUT holds the value of secret {leaked!r}; outputs are journalled"
                " and passed to other actions, so the attempt fails instead"
            )
        return out


class StreamRedactor:
    """Redacts one stream of bytes as it is read: what it returns never holds a secret value,
    even one split across reads (the last ``margin - 1`` bytes wait for the next read)."""

    __slots__ = ("_held", "_keep", "_markers", "_pattern")

    def __init__(self, names: Mapping[str, str], margin: int) -> None:
        values = sorted((v.encode() for v in names), key=len, reverse=True)
        self._markers = {v.encode(): redaction_marker(n).encode() for v, n in names.items()}
        self._pattern = re.compile(b"|".join(re.escape(v) for v in values)) if values else None
        self._keep = max(0, margin - 1)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """The redacted bytes that can leave now, of what was held and ``data``."""
        buf = self._held + data
        if self._pattern is None:
            self._held = b""
            return buf
        # A value that starts before `cut` ends within `buf` (none is longer than margin), so
        # it is found whole; one that starts at or after `cut` may still be arriving.
        cut = max(0, len(buf) - self._keep)
        out: list[bytes] = []
        pos = 0
        for m in self._pattern.finditer(buf):
            if m.start() >= cut:
                break
            out += (buf[pos : m.start()], self._markers[m.group(0)])
            pos = m.end()
        cut = max(cut, pos)
        out.append(buf[pos:cut])
        self._held = buf[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The rest, redacted: the stream has ended."""
        buf, self._held = self._held, b""
        if self._pattern is None or not buf:
            return buf
        return self._pattern.sub(lambda m: self._markers[m.group(0)], buf)
