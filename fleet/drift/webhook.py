"""Drift-alert webhooks: the fleet POSTs a signed JSON alert to an operator's URL (a
"retraining hook") when a device's input distribution drifts.

**The signature.** Anyone who learns the URL can POST to it, so every request carries
``X-Edgefleet-Signature: t=<unix seconds>,v1=<hex>``, where ``v1`` is
HMAC-SHA256(secret, ``f"{t}."`` + the raw body). The timestamp is inside the MAC, so a
captured request cannot be replayed later with a fresh ``t``; the receiver refuses a ``t``
more than five minutes from its own clock. The MAC is over the body's bytes as sent, so a
receiver verifies before parsing (re-serialising the JSON would change the bytes). A
Python receiver, with this module or a copy of :func:`verify`::

    def handle(headers, body: bytes) -> int:
        if not verify(SECRET, headers.get(SIGNATURE_HEADER), body, now=time.time()):
            return 401                                  # forged, tampered or replayed
        if already_handled(headers[DELIVERY_HEADER]):
            return 200                                  # a retry of an alert we have
        start_retraining(json.loads(body)); return 200

Elsewhere: split the header on ``,`` and ``=``, recompute the HMAC over ``t`` + ``.`` +
body, compare in constant time, and check ``|now - t| <= 300``.

**Retries.** A 2xx answer is delivered. A 4xx other than 408 and 429 is permanent: the
receiver has refused this request and the same bytes would be refused again. Anything else
(5xx, 408, 429, a refused connection, a timeout) is retried up to ``max_attempts`` times
with exponential backoff and full jitter (uniform in ``[0, min(max, initial * 2**n))``, so
a fleet's alerts do not come back in step after an outage), or after a numeric
``Retry-After`` when the receiver sends one; both capped at ``backoff_max_s``. Each attempt
is signed with a fresh timestamp, so a long backoff never sends a stale signature.
Redirects are not followed (a signed alert goes to the configured host or nowhere): a 3xx
is permanent. Waits use the caller's ``stop`` event, so a fleet shutting down is not held
by a backoff (an attempt in flight still runs to its ``timeout_s``).

**At-least-once.** An answer lost on the way back looks like a failure, and the caller
retries undelivered alerts later, so a receiver can see an alert more than once. Every
attempt of one alert carries the same ``X-Edgefleet-Delivery`` id (the caller's); receivers
dedupe on it.

Deciding (:func:`classify`, :func:`backoff_delay`, :func:`parse_retry_after`) is pure;
:class:`WebhookSender` does the IO around it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

import fleet
from fleet.errors import InvalidRequestError

__all__ = [
    "DELIVERY_HEADER",
    "MAX_PAYLOAD_BYTES",
    "SIGNATURE_HEADER",
    "SIGNATURE_TOLERANCE_S",
    "USER_AGENT",
    "DeliveryResult",
    "Verdict",
    "WebhookConfigError",
    "WebhookPayloadTooLargeError",
    "WebhookSender",
    "WebhookTarget",
    "backoff_delay",
    "classify",
    "encode_payload",
    "parse_retry_after",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Edgefleet-Signature"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
SIGNATURE_TOLERANCE_S = 300
MAX_PAYLOAD_BYTES = 64 * 1024  # an alert is a summary; a bigger one is a bug, not data
_version = getattr(fleet, "__version__", None)
USER_AGENT = f"edgefleet-fleet/{_version}" if _version else "edgefleet-fleet"

# 408 (request timeout) and 429 (too many requests) say "not now", not "never".
_RETRYABLE_4XX = frozenset({408, 429})
_MAX_HEADER_CHARS = 1024  # a signature header is ~80 characters; refuse junk unparsed
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII: safe in a header
_MAX_ERROR_CHARS = 200


class WebhookConfigError(InvalidRequestError, ValueError):
    """A webhook target, delivery id or payload that cannot be sent as given; nothing was
    sent. A ``ValueError`` for callers that validate configuration, and a fleet error (400)
    for an API that registers targets."""

    reason = "invalid_webhook"


class WebhookPayloadTooLargeError(WebhookConfigError):
    """The encoded alert exceeds :data:`MAX_PAYLOAD_BYTES`; receivers should not have to
    accept unbounded bodies, and an alert that large has stopped being a summary."""

    reason = "webhook_payload_too_large"


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise WebhookConfigError("webhook secret must be non-empty bytes")


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Edgefleet-Signature`` value for ``body`` sent at ``timestamp`` (unix
    seconds): ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>``."""
    _check_secret(secret)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise WebhookConfigError(f"signature timestamp must be a non-negative int: {timestamp!r}")
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(
    secret: bytes,
    header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s`` of
    ``now`` (either side: clocks differ). False for a missing or malformed header, a wrong
    MAC or an old (replayed) or far-future timestamp; never raises on what a client sent.

    Several ``v1`` entries are accepted (any may match), so a sender can sign with an old
    and a new secret while receivers rotate; unknown keys are ignored, so a later scheme
    can be added beside ``v1`` without breaking receivers.
    """
    _check_secret(secret)
    if not isinstance(header, str) or len(header) > _MAX_HEADER_CHARS:
        return False
    timestamps: list[str] = []
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            macs.append(value)
    if len(timestamps) != 1 or not macs:
        return False
    if not (timestamps[0].isascii() and timestamps[0].isdigit()) or len(timestamps[0]) > 12:
        return False  # 12 digits: year 33658; more would overflow a float below
    timestamp = int(timestamps[0])
    if not abs(now - timestamp) <= tolerance_s:  # `not <=`: a NaN now refuses too
        return False
    expected = _mac(secret, timestamp, body)
    matched = False
    for mac in macs:
        # Compare every entry (no early exit) and only well-formed ones (compare_digest
        # wants ASCII); the expected value is always 64 lowercase hex characters.
        if _HEX_SHA256.fullmatch(mac) and hmac.compare_digest(mac, expected):
            matched = True
    return matched


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The alert as compact, key-sorted JSON: the same alert gives the same bytes (and so
    the same body on every attempt). NaN and infinities are refused: drift statistics of an
    empty window are NaN, and ``NaN`` is not JSON (strict receivers reject the body, which
    would look like a permanent failure of the receiver); send ``null`` instead."""
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WebhookConfigError(f"webhook payload is not JSON: {exc}") from exc
    body = text.encode()
    if len(body) > MAX_PAYLOAD_BYTES:
        raise WebhookPayloadTooLargeError(
            f"webhook payload is {len(body)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    return body


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise WebhookConfigError(f"webhook {name} must be a finite number {bound}: {value!r}")


@dataclass(frozen=True)
class WebhookTarget:
    """Where one operator's alerts go and how hard to try. Checked when made, so a bad
    target is refused when it is configured, not at the first drift alert. The secret is
    left out of ``repr`` (targets end up in logs and tracebacks)."""

    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = 5.0
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or any(c.isspace() or ord(c) < 0x20 for c in self.url):
            raise WebhookConfigError(f"webhook URL must be a string without spaces: {self.url!r}")
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
        except ValueError as exc:
            raise WebhookConfigError(f"webhook URL is malformed: {exc}") from exc
        if parts.scheme not in ("http", "https"):
            raise WebhookConfigError(
                f"webhook URL must be http:// or https://, not {parts.scheme or 'no'} scheme"
            )
        if not parts.hostname:
            raise WebhookConfigError("webhook URL has no host")
        _check_secret(self.secret)
        _positive("timeout_s", self.timeout_s)
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise WebhookConfigError(f"webhook max_attempts must be an int: {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise WebhookConfigError(f"webhook max_attempts must be >= 1: {self.max_attempts}")
        _positive("backoff_initial_s", self.backoff_initial_s, zero_ok=True)
        _positive("backoff_max_s", self.backoff_max_s, zero_ok=True)

    @property
    def safe_url(self) -> str:
        """The URL without userinfo, query or fragment (they may hold credentials): what
        logs and results show."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify(status: int | None) -> Verdict:
    """What an attempt's outcome means; ``None`` is no answer at all (refused connection,
    timeout), which is worth retrying. 3xx is permanent: redirects are not followed."""
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status >= 500 or status in _RETRYABLE_4XX:
        return Verdict.RETRY
    return Verdict.PERMANENT


def parse_retry_after(value: str | None) -> float | None:
    """A numeric ``Retry-After`` (seconds) or None; the HTTP-date form is ignored (it
    depends on two clocks agreeing) and falls back to the backoff."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return float(value)


def backoff_delay(
    target: WebhookTarget, attempt: int, retry_after: float | None, rand: float
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): the receiver's
    ``Retry-After`` if it sent one, else full jitter (``rand`` in [0, 1) times the
    exponential step); either way at most ``backoff_max_s``."""
    if retry_after is not None:
        return min(retry_after, target.backoff_max_s)
    step = target.backoff_initial_s * 2.0 ** min(attempt - 1, 64)
    return rand * min(step, target.backoff_max_s)


@dataclass(frozen=True)
class DeliveryResult:
    """How a delivery ended. ``status`` is the last HTTP status (None: no answer);
    ``error`` is short and safe to log or store ("HTTP 500", "ConnectError: ...").
    ``permanent``: retrying the same alert later cannot help. ``stopped``: the caller's stop
    event ended it; the alert is still undelivered and should be retried later."""

    delivered: bool
    attempts: int
    status: int | None
    error: str | None
    permanent: bool
    stopped: bool = False


@dataclass(frozen=True)
class _Attempt:
    status: int | None
    error: str | None
    retry_after: float | None


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class WebhookSender:
    """Delivers alerts over one connection pool. Safe to share between threads (httpx's
    client is). ``transport`` swaps the network in tests; ``rand`` is the jitter source
    and ``clock`` the signature timestamp's (unix seconds)."""

    def __init__(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = httpx.Client(
            transport=transport, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )
        self._rand = rand
        self._clock = clock
        self._state = _State.OPEN

    def __enter__(self) -> WebhookSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool; idempotent. A closed sender refuses to deliver."""
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            self._client.close()

    def deliver(
        self,
        target: WebhookTarget,
        delivery_id: str,
        payload: Mapping[str, Any],
        *,
        stop: threading.Event | None = None,
    ) -> DeliveryResult:
        """POST ``payload`` to ``target`` until delivered, refused for good, out of attempts
        or stopped. ``delivery_id`` is sent on every attempt so the receiver can dedupe;
        the caller keeps it for its own later retries of the same alert. Bad input raises
        :class:`WebhookConfigError` before anything is sent; network and HTTP failures are
        reported in the result, never raised."""
        if self._state is not _State.OPEN:
            raise RuntimeError("WebhookSender is closed")
        if not isinstance(delivery_id, str) or not _DELIVERY_ID.fullmatch(delivery_id):
            raise WebhookConfigError(
                f"delivery id must be 1-200 visible ASCII characters: {delivery_id!r}"
            )
        body = encode_payload(payload)
        stop = stop if stop is not None else threading.Event()  # never set: waits run out
        last = _Attempt(status=None, error=None, retry_after=None)
        for attempt in range(1, target.max_attempts + 1):
            if stop.is_set():
                return self._stopped(attempt - 1, last)
            last = self._attempt(target, delivery_id, body)
            verdict = classify(last.status)
            if verdict is Verdict.DELIVERED:
                return DeliveryResult(
                    delivered=True,
                    attempts=attempt,
                    status=last.status,
                    error=None,
                    permanent=False,
                )
            if verdict is Verdict.PERMANENT:
                self._log_failure(target, delivery_id, attempt, last, "giving up (permanent)")
                return DeliveryResult(
                    delivered=False,
                    attempts=attempt,
                    status=last.status,
                    error=last.error,
                    permanent=True,
                )
            if attempt == target.max_attempts:
                self._log_failure(target, delivery_id, attempt, last, "giving up")
                break
            delay = backoff_delay(target, attempt, last.retry_after, self._rand())
            self._log_failure(target, delivery_id, attempt, last, f"retrying in {delay:.2f}s")
            if stop.wait(delay):
                return self._stopped(attempt, last)
        return DeliveryResult(
            delivered=False,
            attempts=target.max_attempts,
            status=last.status,
            error=last.error,
            permanent=False,
        )

    def _attempt(self, target: WebhookTarget, delivery_id: str, body: bytes) -> _Attempt:
        """One signed POST. Translates httpx's errors at this boundary; the response body
        is never read (a receiver cannot make the fleet buffer an unbounded answer)."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(target.secret, int(self._clock()), body),
            DELIVERY_HEADER: delivery_id,
        }
        try:
            with self._client.stream(
                "POST", target.url, content=body, headers=headers, timeout=target.timeout_s
            ) as response:
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except httpx.RequestError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return _Attempt(status=None, error=error[:_MAX_ERROR_CHARS], retry_after=None)
        error = None if classify(status) is Verdict.DELIVERED else f"HTTP {status}"
        return _Attempt(status=status, error=error, retry_after=retry_after)

    @staticmethod
    def _stopped(attempts: int, last: _Attempt) -> DeliveryResult:
        error = f"stopped after {last.error}" if last.error else "stopped"
        return DeliveryResult(
            delivered=False,
            attempts=attempts,
            status=last.status,
            error=error,
            permanent=False,
            stopped=True,
        )

    @staticmethod
    def _log_failure(
        target: WebhookTarget, delivery_id: str, attempt: int, last: _Attempt, then: str
    ) -> None:
        log.warning(
            "webhook %s delivery %s attempt %d/%d failed: %s; %s",
            target.safe_url,
            delivery_id,
            attempt,
            target.max_attempts,
            last.error,
            then,
        )
