"""The partition proxy of the system tests (tests/system/tcpproxy.py), against an echo server.

Real sockets on loopback; every wait is on an observable (bytes the proxy holds, bytes the echo
server received), never a sleep.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.system.tcpproxy import Direction, TcpProxy

pytestmark = pytest.mark.timeout(30)
WAIT_S = 10.0


class Echo(socketserver.ThreadingTCPServer):
    """Echoes every byte back and records what it received, per connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.cond = threading.Condition()
        self.received: list[bytearray] = []
        self.eofs = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def total(self) -> bytes:
        with self.cond:
            return b"".join(bytes(r) for r in self.received)

    def wait(self, what: str, probe: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(probe, WAIT_S), f"echo server: timed out waiting for {what}"


class EchoHandler(socketserver.BaseRequestHandler):
    server: Echo

    def handle(self) -> None:
        got = bytearray()
        with self.server.cond:
            self.server.received.append(got)
            self.server.cond.notify_all()
        sock: socket.socket = self.request
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                break
            with self.server.cond:
                got += data
                self.server.cond.notify_all()
            try:
                sock.sendall(data)
            except OSError:
                return
        with self.server.cond:
            self.server.eofs += 1
            self.server.cond.notify_all()
        sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)


@pytest.fixture
def proxy(echo: Echo) -> Iterator[TcpProxy]:
    with TcpProxy(echo.target) as p:
        yield p
    assert not p._thread.is_alive(), "the proxy's thread outlived close()"


def dial(proxy: TcpProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"connection closed after {out!r}"
        out += chunk
    return out


def nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(WAIT_S)
    return False


def wait_pending(proxy: TcpProxy, direction: Direction, n: int) -> None:
    """Polls until the proxy holds ``n`` bytes in ``direction`` (read, not forwarded)."""
    deadline = time.monotonic() + WAIT_S
    while (held := proxy.pending(direction)) != n:
        assert time.monotonic() < deadline, f"the proxy holds {held} bytes, not {n}"
        time.sleep(0.01)


def test_forwards_both_ways_and_passes_a_half_close(proxy: TcpProxy, echo: Echo) -> None:
    with dial(proxy) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        sock.shutdown(socket.SHUT_WR)
        echo.wait("the half-close to reach the server", lambda: echo.eofs == 1)
        assert sock.recv(1) == b"", "the server's close reaches the client"
    assert echo.total() == b"hello"


def test_hold_to_server_buffers_until_release(proxy: TcpProxy, echo: Echo) -> None:
    with dial(proxy) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        proxy.hold("to_server")
        assert proxy.held("to_server") and not proxy.held("to_client")
        sock.sendall(b"held")
        wait_pending(proxy, "to_server", 4)
        assert echo.total() == b"a", "nothing crosses a held direction"
        proxy.release("to_server")
        assert recv_exactly(sock, 4) == b"held"
        assert echo.total() == b"aheld"


def test_hold_to_client_delivers_to_the_server_only(proxy: TcpProxy, echo: Echo) -> None:
    with dial(proxy) as sock:
        proxy.hold("to_client")
        sock.sendall(b"ping")
        echo.wait("the server to get the bytes", lambda: echo.total() == b"ping")
        wait_pending(proxy, "to_client", 4)
        assert nothing_to_read(sock), "the echo crossed a held direction"
        # A half-close waits behind the held bytes, in order.
        sock.shutdown(socket.SHUT_WR)
        echo.wait("the half-close to reach the server", lambda: echo.eofs == 1)
        assert nothing_to_read(sock)
        proxy.release("to_client")
        assert recv_exactly(sock, 4) == b"ping"
        assert sock.recv(1) == b""


def test_hold_applies_to_connections_made_while_held(proxy: TcpProxy, echo: Echo) -> None:
    proxy.hold()
    with dial(proxy) as sock:
        sock.sendall(b"new")
        wait_pending(proxy, "to_server", 3)
        assert echo.total() == b""
        proxy.release()
        assert recv_exactly(sock, 3) == b"new"
    assert proxy.accepted == 1


def test_reset_closes_every_connection_abruptly(proxy: TcpProxy, echo: Echo) -> None:
    socks = [dial(proxy) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        assert proxy.open_connections() == 2
        assert proxy.reset() == 2
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        assert proxy.open_connections() == 0
        # The proxy still serves new connections.
        with dial(proxy) as again:
            again.sendall(b"y")
            assert recv_exactly(again, 1) == b"y"
    finally:
        for sock in socks:
            sock.close()


def test_flap_holds_and_releases_then_ends_released(proxy: TcpProxy, echo: Echo) -> None:
    flap = proxy.flap(period=0.2, down=0.1, duration=1.0)
    with dial(proxy) as sock:
        # Everything sent while flapping arrives, in order, whatever phase it was sent in.
        sent = b""
        while not flap.done():
            chunk = str(len(sent)).encode() + b";"
            sock.sendall(chunk)
            sent += chunk
            assert recv_exactly(sock, len(chunk)) == chunk
        report = flap.result(WAIT_S)
        assert report.cycles >= 2, report
        assert 0 < report.held_s <= report.cycles * 0.1 + 0.5, report
        assert not proxy.held("to_server") and not proxy.held("to_client")
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"
    assert echo.total() == sent + b"after"


def test_stop_flap_releases_at_once(proxy: TcpProxy) -> None:
    proxy.flap(period=60.0, down=30.0, duration=120.0)
    assert proxy.held("to_server") and proxy.held("to_client")
    proxy.stop_flap()
    assert not proxy.held("to_server") and not proxy.held("to_client")
    with pytest.raises(ValueError, match="down < period"):
        proxy.flap(period=1.0, down=1.0)


def test_unreachable_upstream_closes_the_client(echo: Echo) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: refused
        with TcpProxy(dead) as proxy:
            # The reset may already come while connecting.
            with pytest.raises(ConnectionResetError), dial(proxy) as sock:
                sock.recv(1)
            assert proxy.open_connections() == 0


def test_close_is_clean_and_final(echo: Echo) -> None:
    proxy = TcpProxy(echo.target).start()
    sock = dial(proxy)
    try:
        proxy.hold()
        sock.sendall(b"pending")
        wait_pending(proxy, "to_server", 7)
        proxy.close()
        assert not proxy._thread.is_alive()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        with pytest.raises(ConnectionRefusedError):
            dial(proxy)
        with pytest.raises(RuntimeError, match="not running"):
            proxy.hold()
        proxy.close()  # idempotent
    finally:
        sock.close()
