"""plait.security.TlsFiles: a worker's or client's TLS files are read again once they change
(a renewed certificate is used from the next connection), and not read again otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.security import TlsFiles


def replace(path: Path, data: bytes) -> None:
    """As a Secret update or an operator's `mv` does: a new file renamed into place."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_changed_file_is_read_again_an_unchanged_one_is_not(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.crt", "tls.crt", "tls.key"))
    for p in (ca, cert, key):
        p.write_bytes(b"first " + p.name.encode())
    tls = TlsFiles(str(ca), str(cert), str(key))
    assert tls.read("cert") == b"first tls.crt"
    first = tls.read("cert")
    assert tls.read("cert") is first  # unchanged: from memory, not read again

    replace(cert, b"renewed tls.crt")
    assert tls.read("cert") == b"renewed tls.crt"
    assert tls.read("key") == b"first tls.key"

    cert.unlink()
    with pytest.raises(ConfigError, match=r"--tls-cert .*tls.crt: No such file"):
        tls.read("cert")
