"""A throwaway PostgreSQL server for the HA system tests (Debian's ``initdb`` + ``pg_ctl``).

:class:`PgServer` runs ``initdb`` into a fresh directory and starts the server on a free
loopback port with durability switched off (the tests kill coordinators, never PostgreSQL),
running as the ``postgres`` user when the tests run as root (PostgreSQL refuses root).
:meth:`PgServer.stop` shuts it down immediately and deletes the directory.

The server is daemonised by ``pg_ctl``, so — the test process being a child subreaper — the
postmaster and its backends are our descendants: :attr:`PgServer.pgid` lets a cluster's leak
check tell them from a coordinator's or an action's processes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/bin", "/usr/bin")


def find_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl`` from Debian's versioned directory (newest first) or PATH."""
    for pattern in SEARCH:
        for directory in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            candidate = directory / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """Why PostgreSQL cannot be started here, or None when it can."""
    if find_bin("initdb") is None or find_bin("pg_ctl") is None:
        return "initdb/pg_ctl not installed (apt-get install -y postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


class PgServer:
    """One PostgreSQL server in a temp dir; ``dsn`` points at its ``postgres`` database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="plait-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.pgid: int | None = None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self._user is not None:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> PgServer:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        assert initdb and pg_ctl, available()
        done = self._run(
            [
                initdb,
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                # No background workers that come and go: the leak checks would see them.
                "-c autovacuum=off",
                "-c max_parallel_workers_per_gather=0",
                "-c max_connections=50",
            ]
        )
        log = self.dir / "server.log"
        done = self._run(
            [pg_ctl, "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start"]
        )
        assert done.returncode == 0, (
            f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
        )
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.pgid = os.getpgid(pid)
        self._wait_accepting()
        return self

    def _wait_accepting(self, timeout: float = 20) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self, limit: int = 5000) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-limit:]
        except OSError:
            return "<no server log>"

    def stop(self) -> None:
        pg_ctl = find_bin("pg_ctl")
        if pg_ctl and (self.data / "postmaster.pid").exists():
            self._run([pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"], timeout=30)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)
