"""Drift-alert webhooks against a real local HTTP server: what arrives, how it is signed,
which answers are retried, and that a stopping fleet is not held by a backoff."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleet.drift.webhook import (
    DELIVERY_HEADER,
    MAX_PAYLOAD_BYTES,
    SIGNATURE_HEADER,
    Verdict,
    WebhookConfigError,
    WebhookPayloadTooLargeError,
    WebhookSender,
    WebhookTarget,
    backoff_delay,
    classify,
    parse_retry_after,
    sign,
    verify,
)

SECRET = b"test-webhook-secret"
ALERT = {"device_id": "dev-1", "feature": "temp", "psi": 0.42, "raised": True}
DEADLINE_S = 10.0  # generous: a loaded two-core machine still answers a local POST in far less


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A scripted webhook receiver: answers each POST with the next (status, headers) of
    ``script`` (200 once it runs out) and records what it was sent. ``hold`` makes it keep
    the request open without answering until the server closes (a receiver that hangs)."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    got_request: threading.Event = field(default_factory=threading.Event)
    hold: bool = False
    closing: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.lock:
                    owner.received.append(Received(self.path, dict(self.headers), body))
                    status, headers = owner.script.pop(0) if owner.script else (200, {})
                owner.got_request.set()
                if owner.hold:
                    owner.closing.wait(DEADLINE_S * 3)
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/drift"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(DEADLINE_S)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    with WebhookSender() as s:
        yield s


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A port that refuses connections: bound (so nothing else takes it during the test)
    but never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


def fast_target(url: str, **overrides) -> WebhookTarget:
    settings = {
        "timeout_s": 5.0,
        "max_attempts": 6,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
    } | overrides
    return WebhookTarget(url=url, secret=SECRET, **settings)


# --- signature ------------------------------------------------------------------------


def test_an_alert_arrives_once_as_signed_json_with_its_delivery_id(receiver, sender):
    result = sender.deliver(fast_target(receiver.url), "alert-0001", ALERT)

    assert result.delivered and result.attempts == 1 and result.status == 200
    assert result.error is None and not result.permanent and not result.stopped
    assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.path == "/hooks/drift"
    assert json.loads(got.body) == ALERT
    assert got.body == json.dumps(ALERT, sort_keys=True, separators=(",", ":")).encode()
    assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.body, now=time.time())
    assert got.headers[DELIVERY_HEADER] == "alert-0001"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"].startswith("edgefleet-fleet")


def test_the_signature_header_is_stripe_style_over_timestamp_and_body():
    header = sign(SECRET, 1_700_000_000, b'{"a":1}')
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    assert v1.startswith("v1=") and len(v1) == 3 + 64
    assert verify(SECRET, header, b'{"a":1}', now=1_700_000_000.5)


def test_a_tampered_body_a_wrong_secret_or_an_old_timestamp_fails_verification():
    body = b'{"device_id":"dev-1"}'
    now = 1_700_000_000
    header = sign(SECRET, now, body)

    assert not verify(SECRET, header, b'{"device_id":"dev-2"}', now=now)
    assert not verify(b"another-secret", header, body, now=now)
    assert not verify(SECRET, sign(SECRET, now - 301, body), body, now=now)  # replayed
    assert not verify(SECRET, sign(SECRET, now + 301, body), body, now=now)  # far future
    assert verify(SECRET, sign(SECRET, now - 299, body), body, now=now)
    assert not verify(SECRET, sign(SECRET, now - 30, body), body, now=now, tolerance_s=10)


def test_a_replayed_signature_with_a_fresh_timestamp_fails_verification():
    body = b'{"device_id":"dev-1"}'
    mac = sign(SECRET, 1_000, body).split(",")[1]
    assert not verify(SECRET, f"t=1700000000,{mac}", body, now=1_700_000_000)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1700000000",  # no signature
        "v1=" + "0" * 64,  # no timestamp
        "t=abc,v1=" + "0" * 64,
        "t=-5,v1=" + "0" * 64,
        "t=1700000000,t=1700000000,v1=" + "0" * 64,  # two timestamps
        "t=1700000000,v1=nothex",
        "t=1700000000,v1=é" + "0" * 63,  # non-ASCII must not raise from compare_digest
        "t=1700000000;v1=" + "0" * 64,
        "t=1" + "0" * 400 + ",v1=" + "0" * 64,  # a huge timestamp must not overflow
        "t=1700000000,v1=" + "0" * 64 + ",x" * 600,  # oversized
    ],
)
def test_a_malformed_signature_header_fails_verification(header):
    assert not verify(SECRET, header, b"{}", now=1_700_000_000)


def test_any_of_several_v1_signatures_verifies_so_secrets_can_rotate():
    body = b"{}"
    old = sign(b"old-secret", 1_700_000_000, body)
    new_mac = sign(SECRET, 1_700_000_000, body).split(",")[1]
    assert verify(SECRET, f"{old},{new_mac}", body, now=1_700_000_000)
    assert verify(SECRET, f"{old},{new_mac},v9=future-scheme", body, now=1_700_000_000)


# --- retries --------------------------------------------------------------------------


def test_a_receiver_failing_twice_gets_the_alert_on_the_third_attempt(receiver, sender):
    receiver.script = [(500, {}), (500, {})]
    result = sender.deliver(fast_target(receiver.url), "alert-0002", ALERT)

    assert result.delivered and result.attempts == 3 and result.status == 200
    assert len(receiver.received) == 3
    assert {r.headers[DELIVERY_HEADER] for r in receiver.received} == {"alert-0002"}
    assert len({r.body for r in receiver.received}) == 1  # the same bytes every time
    for got in receiver.received:  # every attempt is signed afresh, and validly
        assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.body, now=time.time())


def test_429_with_retry_after_is_retried(receiver, sender):
    receiver.script = [(429, {"Retry-After": "0"})]
    target = fast_target(receiver.url, backoff_initial_s=30.0, backoff_max_s=60.0)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(sender.deliver(target, "a-3", ALERT)))
    worker.start()
    worker.join(DEADLINE_S)  # Retry-After: 0 replaces a backoff of up to 30 s

    assert not worker.is_alive(), "Retry-After: 0 was not honoured"
    assert done[0].delivered and done[0].attempts == 2


def test_408_and_503_are_retried(receiver, sender):
    receiver.script = [(408, {}), (503, {})]
    result = sender.deliver(fast_target(receiver.url), "alert-0004", ALERT)
    assert result.delivered and result.attempts == 3


@pytest.mark.parametrize("status", [400, 401, 404, 410, 302])
def test_a_refusal_or_redirect_is_permanent_and_not_retried(receiver, sender, status):
    headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 302 else {}
    receiver.script = [(status, headers)]
    result = sender.deliver(fast_target(receiver.url), "alert-0005", ALERT)

    assert not result.delivered and result.permanent
    assert result.attempts == 1 and result.status == status
    assert result.error == f"HTTP {status}"
    assert len(receiver.received) == 1


def test_persistent_5xx_gives_up_after_max_attempts(receiver, sender):
    receiver.script = [(500, {})] * 10
    result = sender.deliver(fast_target(receiver.url, max_attempts=4), "alert-0006", ALERT)

    assert not result.delivered and not result.permanent and not result.stopped
    assert result.attempts == 4 and result.status == 500 and result.error == "HTTP 500"
    assert len(receiver.received) == 4


def test_a_refused_connection_is_retried_up_to_max_attempts(refusing_url, sender):
    result = sender.deliver(fast_target(refusing_url, max_attempts=3), "alert-0007", ALERT)

    assert not result.delivered and not result.permanent
    assert result.attempts == 3 and result.status is None
    assert result.error is not None and result.error.startswith("ConnectError")


def test_a_receiver_that_hangs_times_out_and_is_retried():
    server = Receiver(hold=True)
    try:
        with WebhookSender() as sender:
            target = fast_target(server.url, timeout_s=0.2, max_attempts=2)
            result = sender.deliver(target, "alert-0008", ALERT)
    finally:
        server.close()

    assert not result.delivered and result.attempts == 2 and result.status is None
    assert result.error is not None and result.error.startswith("ReadTimeout")
    assert len(server.received) == 2


def test_a_stop_during_backoff_returns_promptly_undelivered(receiver, sender):
    receiver.script = [(500, {})] * 10
    target = fast_target(receiver.url, backoff_initial_s=30.0, backoff_max_s=60.0)
    stop = threading.Event()
    done: list = []
    with WebhookSender(rand=lambda: 1.0) as patient:  # no jitter: a full 30 s backoff
        worker = threading.Thread(
            target=lambda: done.append(patient.deliver(target, "alert-0009", ALERT, stop=stop))
        )
        worker.start()
        assert receiver.got_request.wait(DEADLINE_S), "the first attempt never arrived"
        stop.set()
        worker.join(DEADLINE_S)

    assert not worker.is_alive(), "deliver() was held by its backoff after stop was set"
    result = done[0]
    assert not result.delivered and result.stopped and not result.permanent
    assert result.attempts == 1 and result.status == 500
    assert result.error == "stopped after HTTP 500"


def test_a_stop_already_set_sends_nothing(receiver, sender):
    stop = threading.Event()
    stop.set()
    result = sender.deliver(fast_target(receiver.url), "alert-0010", ALERT, stop=stop)
    assert result.stopped and result.attempts == 0 and not result.delivered
    assert receiver.received == []


def test_failed_attempts_are_logged_without_secret_userinfo_or_query(receiver, sender, caplog):
    receiver.script = [(500, {}), (500, {})]
    port = receiver.server.server_address[1]
    url = f"http://ops:pa55word@127.0.0.1:{port}/hooks/drift?token=abc123"
    caplog.set_level(logging.WARNING, logger="fleet.drift.webhook")

    assert sender.deliver(fast_target(url), "alert-0011", ALERT).delivered

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"http://127.0.0.1:{port}/hooks/drift" in warnings[0]
    assert "attempt 1/6" in warnings[0] and "HTTP 500" in warnings[0]
    assert "attempt 2/6" in warnings[1]
    for text in warnings:
        assert "pa55word" not in text and "abc123" not in text
        assert SECRET.decode() not in text
    assert SECRET.decode() not in repr(fast_target(url))


# --- the decisions, without a network -------------------------------------------------


def test_classify_says_which_answers_are_worth_retrying():
    assert classify(200) is classify(204) is Verdict.DELIVERED
    assert classify(None) is classify(408) is classify(429) is classify(500) is Verdict.RETRY
    assert classify(400) is classify(403) is classify(301) is Verdict.PERMANENT


def test_backoff_is_full_jitter_capped_and_retry_after_wins_but_is_capped_too():
    target = WebhookTarget(
        url="https://ops.example/h", secret=SECRET, backoff_initial_s=1.0, backoff_max_s=60.0
    )
    assert backoff_delay(target, 1, None, 0.5) == 0.5
    assert backoff_delay(target, 4, None, 0.5) == 4.0
    assert backoff_delay(target, 10, None, 0.999) <= 60.0
    assert backoff_delay(target, 10_000, None, 0.5) == 30.0  # no overflow on many attempts
    assert backoff_delay(target, 1, None, 0.0) == 0.0
    assert backoff_delay(target, 1, 7.0, 0.0) == 7.0
    assert backoff_delay(target, 1, 3600.0, 0.0) == 60.0


def test_only_a_numeric_retry_after_is_honoured():
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 12 ") == 12.0
    for value in (None, "", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT", "soon"):
        assert parse_retry_after(value) is None


# --- refusals before anything is sent -------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://ops.example/hook",
        "http://",
        "https:///path",
        "ops.example/hook",
        "",
        "http://ops.example:notaport/",
        "http://ops example/",
        "file:///etc/passwd",
    ],
)
def test_a_target_url_that_is_not_http_or_has_no_host_is_refused(url):
    with pytest.raises(WebhookConfigError):
        WebhookTarget(url=url, secret=SECRET)


def test_an_empty_secret_is_refused():
    with pytest.raises(WebhookConfigError, match="secret"):
        WebhookTarget(url="https://ops.example/hook", secret=b"")
    with pytest.raises(WebhookConfigError, match="secret"):
        sign(b"", 1, b"{}")
    with pytest.raises(WebhookConfigError, match="secret"):
        verify(b"", "t=1,v1=" + "0" * 64, b"{}", now=1)


@pytest.mark.parametrize(
    "settings",
    [
        {"timeout_s": 0},
        {"max_attempts": 0},
        {"backoff_initial_s": -1.0},
        {"backoff_max_s": float("nan")},
    ],
)
def test_nonsense_retry_settings_are_refused(settings):
    with pytest.raises(WebhookConfigError):
        WebhookTarget(url="https://ops.example/hook", secret=SECRET, **settings)


def test_webhook_config_error_is_a_value_error():
    assert issubclass(WebhookConfigError, ValueError)
    assert issubclass(WebhookPayloadTooLargeError, WebhookConfigError)


def test_a_payload_over_64_kib_is_refused_before_anything_is_sent(receiver, sender):
    big = {"blob": "x" * MAX_PAYLOAD_BYTES}
    with pytest.raises(WebhookPayloadTooLargeError):
        sender.deliver(fast_target(receiver.url), "alert-0012", big)
    assert receiver.received == []


def test_a_payload_that_is_not_strict_json_is_refused(receiver, sender):
    with pytest.raises(WebhookConfigError, match="JSON"):
        sender.deliver(fast_target(receiver.url), "alert-0013", {"psi": float("nan")})
    with pytest.raises(WebhookConfigError, match="JSON"):
        sender.deliver(fast_target(receiver.url), "alert-0013", {"when": object()})
    assert receiver.received == []


@pytest.mark.parametrize("delivery_id", ["", "has space", "line\nbreak", "x" * 201])
def test_a_delivery_id_that_cannot_be_a_header_is_refused(receiver, sender, delivery_id):
    with pytest.raises(WebhookConfigError, match="delivery id"):
        sender.deliver(fast_target(receiver.url), delivery_id, ALERT)


def test_a_closed_sender_refuses_to_deliver(receiver):
    sender = WebhookSender()
    sender.close()
    sender.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sender.deliver(fast_target(receiver.url), "alert-0014", ALERT)
