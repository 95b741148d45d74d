"""Reading a file an action left in its directory, without trusting it (workerd layer).

The action owns its directory, so ``$PLAIT_OUTPUT`` may be anything: a symlink to a file
outside (which workerd, maybe root, could read), a FIFO (an ``open`` or ``read`` that never
returns), ``/dev/zero`` (a read that never ends), or a hard link to a file of another user. So
it is opened with ``O_NOFOLLOW|O_NONBLOCK``, must then be a regular file (``fstat`` of what was
opened, not of the path), owned by the attempt's user when it has one of its own, and at most
``limit + 1`` bytes are read. The executor calls this in a thread, off the event loop, so a slow
file system cannot stall heartbeats either.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["read_output_file"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)
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
