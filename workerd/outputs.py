"""Reading a file an action left in its directory, without trusting it (workerd layer).

The action owns its directory, so ``$PLAIT_OUTPUT`` may be anything: a symlink to a file
outside (which workerd, maybe root, could read), a FIFO (an ``open`` or ``read`` that never
returns), ``/dev/zero`` (a read that never ends), or a hard link to a file of another user. So
it is opened with ``O_NOFOLLOW|O_NONBLOCK``, must then be a regular file (``fstat`` of what was
opened, not of the path), owned by the attempt's user when it has one of its own, and at most
``limit + 1`` bytes are read. The executor calls this in a thread, off the event loop, so a slow
file system cannot stall heartbeats either; only whether there is a file at all
(:func:`output_exists`, one ``lstat``) is asked on the loop.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from plait.jsonlimits import MAX_JSON_DEPTH, nesting_exceeds

__all__ = ["output_exists", "read_output_file", "read_outputs"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)
_JSON_TYPE = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_output_file(
    path: str, limit: int, *, owner: int | None = None, name: str = "$PLAIT_OUTPUT"
) -> tuple[bytes | None, str]:
    """(content, '') — ``None`` when there is no file — or (None, problem naming ``name``).

    Reads at most ``limit + 1`` bytes, so the caller sees when it is over ``limit``. Blocking
    I/O: call it off the event loop.
    """
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        return None, ""
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, f"{name} is a symbolic link; write the outputs to the file itself"
        if err.errno == errno.ENXIO:
            return None, f"{name} is a socket, not a regular file"
        return None, f"{name} cannot be opened: {err.strerror or err}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{name} is {_kind(st.st_mode)}, not a regular file"
        if owner is not None and st.st_uid != owner:
            return None, (
                f"{name} belongs to uid {st.st_uid}, not to the attempt's user {owner} (a link"
                " to someone else's file?)"
            )
        if st.st_size > limit:
            return None, f"{name} is {st.st_size} bytes, over the {limit}-byte limit"
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), ""
    except OSError as err:
        return None, f"{name} cannot be read: {err.strerror or err}"
    finally:
        os.close(fd)


def output_exists(path: str) -> bool:
    """Whether anything is at ``path`` (a symlink counts): one ``lstat``, so the executor knows
    an action wrote no output without a thread hop."""
    return os.path.lexists(path)


def read_outputs(path: str, limit: int, owner: int | None = None) -> tuple[str, str]:
    """(outputs JSON, "") or ("", error) for the file an action wrote to ``$PLAIT_OUTPUT``.

    An absent or empty file means ``{}``. The file must be a regular file (not a symlink, FIFO
    or device; owned by ``owner`` when given): see :func:`read_output_file`. Blocking I/O: the
    executor calls it in a thread.
    """
    data, problem = read_output_file(path, limit, owner=owner)
    if problem:
        return "", problem
    if data is None:
        return "{}", ""
    if len(data) > limit:
        return "", f"$PLAIT_OUTPUT is over the {limit}-byte limit"
    if not data.strip():
        return "{}", ""
    try:
        text = data.decode("utf-8")
        if nesting_exceeds(text):  # json.loads would recurse once per level
            return "", f"$PLAIT_OUTPUT nests deeper than {MAX_JSON_DEPTH} levels"
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        return "", f"$PLAIT_OUTPUT is not valid JSON: {err}"
    if not isinstance(obj, dict):
        kind = "null" if obj is None else _JSON_TYPE.get(type(obj), type(obj).__name__)
        return "", f"$PLAIT_OUTPUT must hold a JSON object, not {kind}"
    return json.dumps(obj, separators=(",", ":")), ""
