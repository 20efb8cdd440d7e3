"""The fault proxy (tests/fixtures/fault_proxy.py) does what each fault says, on a local
echo server and a local byte source."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.waiting import wait_until


class _Server:
    """Echoes what it reads; or, for a connection that first sends b"S<n>\\n", sends n bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                first = conn.recv(65536)
                if first.startswith(b"S"):
                    conn.sendall(b"x" * int(first[1:].split(b"\n")[0]))
                    return
                data = first
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            except OSError:
                return


@pytest.fixture
def server() -> Iterator[_Server]:
    made = _Server()
    yield made
    made.sock.close()


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def _receive(sock: socket.socket, count: int) -> bytes:
    got = b""
    while len(got) < count:
        chunk = sock.recv(count - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_bytes_pass_both_ways_and_are_counted(server, fault_proxy):
    proxy = fault_proxy(server.port)
    with _connect(proxy.port) as sock:
        sock.sendall(b"hello" * 1000)
        assert _receive(sock, 5000) == b"hello" * 1000
    wait_until(lambda: proxy.bytes_up == 5000 and proxy.bytes_down == 5000, timeout=5,
               what="the counters")
    assert proxy.connections == 1


def test_black_hole_passes_nothing_and_closes_nothing_until_healed(server, fault_proxy):
    proxy = fault_proxy(server.port)
    old = _connect(proxy.port, timeout=0.5)
    old.sendall(b"ping")
    assert _receive(old, 4) == b"ping"
    proxy.black_hole()
    old.sendall(b"lost")
    with pytest.raises(TimeoutError):  # no data, no FIN, no RST: silence
        old.recv(10)
    wait_until(lambda: proxy.dropped_up == 4, timeout=5, what="the dropped bytes counted")
    new = _connect(proxy.port, timeout=0.5)  # accepted, but reaches nothing
    new.sendall(b"anyone?")
    with pytest.raises(TimeoutError):
        new.recv(10)
    accepted = server.accepted
    proxy.heal()
    with _connect(proxy.port) as healed:
        healed.sendall(b"back")
        assert _receive(healed, 4) == b"back"
    assert server.accepted == accepted + 1
    old.sendall(b"still")  # a connection that died stays dead, as behind a NAT
    with pytest.raises(TimeoutError):
        old.recv(10)
    old.close()
    new.close()


def test_reset_after_n_bytes_passes_exactly_n_then_rst(server, fault_proxy):
    proxy = fault_proxy(server.port)
    proxy.reset_after(100_000, direction="down")
    with _connect(proxy.port) as sock:
        sock.sendall(b"S300000\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
        assert len(got) == 100_000
    assert proxy.resets == 1
    proxy.reset_after(None)
    with _connect(proxy.port) as sock:
        sock.sendall(b"S300000\n")
        assert len(_receive(sock, 300_000)) == 300_000


def test_rate_cap_holds_a_download_to_its_rate(server, fault_proxy):
    proxy = fault_proxy(server.port)
    proxy.set_rate(200_000, direction="down")
    with _connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(b"S200000\n")
        assert len(_receive(sock, 200_000)) == 200_000
        took = time.monotonic() - started
    assert 0.9 <= took < 3, took  # 1 s at the cap; a loaded machine only adds


def test_latency_delays_each_direction(server, fault_proxy):
    proxy = fault_proxy(server.port)
    proxy.set_latency(100, jitter_ms=20)
    with _connect(proxy.port) as sock:
        started = time.monotonic()
        for _ in range(3):
            sock.sendall(b"x" * 100)
            assert _receive(sock, 100) == b"x" * 100
        took = time.monotonic() - started
    assert took >= 3 * 2 * 0.08, took


def test_refuse_and_a_partition_that_heals_by_itself(server, fault_proxy):
    proxy = fault_proxy(server.port)
    proxy.refuse()
    with pytest.raises(ConnectionError), _connect(proxy.port) as sock:
        sock.sendall(b"x")
        sock.recv(1)
    proxy.heal()
    proxy.partition(0.5, refuse=True)
    assert proxy.faulty

    def echoes() -> bool:
        try:
            with _connect(proxy.port, timeout=1) as sock:
                sock.sendall(b"y")
                return sock.recv(1) == b"y"
        except OSError:
            return False

    wait_until(echoes, timeout=10, what="the partition to heal by itself")
    assert not proxy.faulty and proxy.healed_at is not None
