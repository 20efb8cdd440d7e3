"""What ``edge-agent enroll`` accepts as the fleet's broker: untrusted input, bounded and
checked (a real local HTTP server answers what each case needs)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from agent.trust.client import fetch_device_broker


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fleet() -> Iterator:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answering(status: int, body: bytes | dict) -> str:
        server.answer = (status, body if isinstance(body, bytes) else json.dumps(body).encode())
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield answering
    server.shutdown()
    server.server_close()


def test_the_broker_the_fleet_names_is_taken_as_host_and_port(fleet):
    assert fetch_device_broker(fleet(200, {"broker": "mqtt://fleet.lan:1883"})) == (
        "mqtt://fleet.lan:1883")
    assert fetch_device_broker(fleet(200, {"broker": "mqtts://[2001:db8::1]:8883"})) == (
        "mqtts://[2001:db8::1]:8883")


def test_a_fleet_that_does_not_say_gives_none(fleet):
    assert fetch_device_broker(fleet(404, b"not found")) is None  # an older fleet
    assert fetch_device_broker(fleet(200, {"broker": None})) is None  # no broker


@pytest.mark.parametrize(("status", "body", "says"), [
    (200, {"broker": "mqtt://user:secret@fleet.lan:1883"}, "is not mqtt://HOST:PORT"),
    (200, {"broker": "http://fleet.lan:1883"}, "is not mqtt://HOST:PORT"),
    (200, {"broker": "mqtt://fleet.lan:1883/path"}, "is not mqtt://HOST:PORT"),
    (200, {"broker": "mqtt://fleet.lan:99999"}, "port is not a number"),
    (200, {"broker": 1883}, "broker must be a string, given int"),
    (200, b"[1, 2", "not JSON"),
    (200, b"{" + b" " * 5000 + b"}", "answer larger than 4096 bytes"),
    (500, b"oops", "HTTP 500"),
])
def test_a_broken_or_hostile_answer_is_refused_naming_the_problem(fleet, status, body, says):
    with pytest.raises(ValueError, match=says):
        fetch_device_broker(fleet(status, body))
