"""HTTP/1.1 on asyncio for the inference endpoint: parsing, limits, deadlines, keep-alive.

Why this shape:

* One event loop thread serves every connection. A thread per connection (the previous
  ``http.server`` endpoint) costs a stack and a scheduler entry per client and could only
  time out whole reads; here a connection is a small object and every phase of a request
  has its own deadline.
* The parser is httptools (Node.js's llhttp, in C), not h11. Parsing one keep-alive
  request and writing its answer measured 1.4 us with httptools and 47 us with h11 on the
  CI machine, where a whole batch-1 request costs ~100 us: h11 alone would be half of what
  the endpoint adds. llhttp is strict where it matters for a body limit: Content-Length is
  digits only and given once, never together with ``Transfer-Encoding``; chunked framing
  is checked. This module checks Content-Length again itself, so the limit does not rest on
  one library's reading of the RFC.
* Every limit is enforced here, before the application sees a byte: header bytes and count
  (431), the body by its declared length before it is read and by its running total when
  chunked (413), a deadline for the request line and headers and another for the body
  (408, then closed), the idle time between requests (closed), the number of connections
  served (one more is answered 503 and closed). A refused body of a few times the limit is
  read and dropped, so the client sees the answer rather than a reset; a larger one is not
  worth reading.
* The last answer on a connection (a refusal, or ``Connection: close``) is followed by FIN,
  and what the client still sends is dropped for a moment: closing with unread bytes
  would reset the connection, and the client could lose the answer that says why.
* Answers go out in request order, each in one write. The application returns either a
  :class:`Response` (computed on the loop) or a function that makes one: that runs in the
  thread pool while the connection stops reading, so pipelined requests wait their turn and
  other connections keep being served.
* Deadlines are one number per connection, checked by one timer that runs only while
  connections are open: arming and cancelling a timer per phase would cost more than
  parsing the request does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import NamedTuple, NoReturn, TypeAlias

import httptools
import msgspec

__all__ = [
    "HttpError",
    "HttpLimits",
    "HttpServer",
    "Request",
    "Response",
]

log = logging.getLogger(__name__)

# A refused body up to this many times the limit is read and dropped before closing.
DISCARD_FACTOR = 8
LINGER_S = 2.0  # after the last answer, how long what the client still sends is dropped
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    """Every bound the server enforces; timeouts in seconds."""

    max_body_bytes: int
    max_connections: int = 64
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0  # request line and headers, from the first byte (or connect)
    body_timeout_s: float = 60.0  # the body, from the end of the headers
    idle_timeout_s: float = 120.0  # between requests on a kept-alive connection
    refused_timeout_s: float = 5.0  # a connection over the limit, to say its request
    too_large_advice: str = ""  # appended to every 413

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_connections < 1:
            raise ValueError("max_body_bytes and max_connections must be at least 1")
        timeouts = (self.head_timeout_s, self.body_timeout_s, self.idle_timeout_s,
                    self.refused_timeout_s)
        if not all(t > 0 for t in timeouts):
            raise ValueError(f"timeouts must be positive, given {timeouts}")


class Request(NamedTuple):
    method: str
    target: str  # path and query, as sent
    headers: dict[bytes, bytes]  # lower-case names, as sent (decoding all costs per request)
    body: bytes
    keep_alive: bool


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler: TypeAlias = Callable[[Request], Response | Callable[[], Response]]
"""The application: an answer now, or a function the thread pool runs to make it."""


class HttpError(Exception):
    """A request refused by the HTTP layer; answered with a JSON reason, then closed."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return Response(self.status, msgspec.json.encode({"error": str(self)}))


# Parser phases of a connection: between requests, reading the head, reading the body.
_IDLE, _HEAD, _BODY = 0, 1, 2


class _Connection(asyncio.Protocol):
    """One client connection. Parser callbacks build requests into ``_queue``; the queue is
    answered in order, one request at a time."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self._handler = server.handler
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | HttpError] = deque()
        self._busy = False  # an answer is being made in the pool
        self._broken = False  # the parser failed or the request was refused: read no more
        self._write_paused = False
        self._admitted = False
        self._phase = _HEAD
        self._deadline = float("inf")
        self._head_bytes = 0
        self._paused = False  # reading paused by us (pipelining, a slow reader, a refusal)
        self._refusal: HttpError | None = None  # answered once the refused body is dropped
        self._lingering = False  # answered for the last time: dropping input until EOF
        self._linger_left = 0
        self._now = 0.0
        self.on_message_begin()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._admitted = self._server.admit(self)
        limits = self._limits
        timeout = limits.head_timeout_s if self._admitted else limits.refused_timeout_s
        self._deadline = time.monotonic() + timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self._queue.clear()
        self._server.forget(self, self._admitted)

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_if_ready()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume_if_ready(self) -> None:
        if self._paused and not (self._busy or self._broken or self._write_paused):
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            if self._lingering:
                self._linger_left -= len(data)
                if self._linger_left < 0 and self._transport is not None:
                    self._transport.close()
            return
        self._now = time.monotonic()  # one clock read for every deadline this data moves
        if self._phase != _BODY:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, HttpError):
                log.error("HTTP parser callback failed", exc_info=cause)
                cause = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "the agent failed")
            self._fail(cause)
        except httptools.HttpParserUpgrade:
            self._fail(HttpError(HTTPStatus.BAD_REQUEST, "protocol upgrade is not supported"))
        except httptools.HttpParserError as exc:
            self._fail(HttpError(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {exc}"))
        else:
            if self._phase == _HEAD and self._head_bytes > self._limits.max_head_bytes:
                self._fail(self._head_too_large())
        self._answer_queue()

    def eof_received(self) -> bool | None:
        return None  # close our side too: a half-closed client sends no further request

    # -- httptools callbacks ----------------------------------------------------------

    # These run for every request: helpers are inlined where a call would be most of the cost.

    def on_message_begin(self) -> None:
        self._url = b""
        self._header_count = 0
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._length: int | None = None
        if self._phase == _IDLE and self._admitted:
            self._deadline = self._now + self._limits.head_timeout_s
        self._phase = _HEAD

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key == b"content-length":
            if self._length is None and value.isdigit() and len(value) < 19:
                self._length = int(value)  # bytes.isdigit: ASCII digits only
            else:
                _refuse_content_length(value, self._length)
        self._headers[key] = value  # a repeated header keeps its last value
        self._header_count += 1

    def on_headers_complete(self) -> None:
        """Head limits are checked here, not per header: ``data_received`` bounds what an
        incomplete head can buffer; here the head's size is added up only when the bytes
        read for it do not already show that it is small."""
        self._phase = _BODY
        read, self._head_bytes = self._head_bytes, 0
        limits = self._limits
        headers = self._headers
        if self._header_count > limits.max_headers:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"more than {limits.max_headers} request headers")
        if (not read or read > limits.max_head_bytes) and limits.max_head_bytes < (
                len(self._url) + sum(map(len, headers)) + sum(map(len, headers.values()))):
            raise self._head_too_large()
        length = self._length
        if self._admitted and (length is None or length <= limits.max_body_bytes):
            self._deadline = self._now + limits.body_timeout_s
            expect = headers.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue" and self._transport:
                self._transport.write(_CONTINUE)  # the client waits for this to send the body
            return
        self._refuse_at_head()

    def _refuse_at_head(self) -> None:
        """Over the connection limit, or the declared body over the size limit."""
        if self._admitted:
            self._deadline = self._now + self._limits.body_timeout_s
            refusal = self._too_large(f"request body of {self._length} bytes is over")
        else:
            limit = self._limits.max_connections
            refusal = HttpError(HTTPStatus.SERVICE_UNAVAILABLE,
                                f"too many connections to the agent (limit {limit}); "
                                "reuse a connection or retry")
        expects = self._headers.get(b"expect", b"").lower() == b"100-continue"
        if expects or (self._length or 0) > DISCARD_FACTOR * self._limits.max_body_bytes:
            raise refusal  # no body is coming, or it is not worth reading
        self._refusal = refusal  # answered once the body is read and dropped

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._refusal is not None:
            if self._body_size > DISCARD_FACTOR * self._limits.max_body_bytes:
                raise self._refusal
            return
        if self._body_size > self._limits.max_body_bytes:  # chunked: the length was unknown
            self._refusal = self._too_large("chunked request body is over")
            self._body.clear()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if self._admitted:
            self._deadline = self._now + self._limits.idle_timeout_s
        if self._refusal is not None:
            self._fail(self._refusal)
            return
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parser = self._parser
        self._queue.append(_new_tuple(Request, (  # Request(...) without a Python-level call
            parser.get_method().decode("ascii"), self._url.decode("latin-1"), self._headers,
            body, parser.should_keep_alive(),
        )))
        if self._busy or len(self._queue) > 1:
            self._pause()  # pipelined: read on once these are answered

    # -- refusals and deadlines -------------------------------------------------------

    def _too_large(self, what: str) -> HttpError:
        limits = self._limits
        message = f"{what} the {limits.max_body_bytes}-byte limit"
        if limits.too_large_advice:
            message += f" ({limits.too_large_advice})"
        return HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)

    def _head_too_large(self) -> HttpError:
        return HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                         f"request line and headers over {self._limits.max_head_bytes} bytes")

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: end a connection whose current phase ran out."""
        if now < self._deadline or self._transport is None or self._transport.is_closing():
            return
        if self._lingering:
            self._transport.close()
            return
        if self._phase == _IDLE:
            if self._busy or self._queue:
                return  # not idle: the agent is answering
            self._transport.close()
        elif self._refusal is not None:  # the refused body never finished: say why anyway
            self._fail(self._refusal)
        elif self._phase == _HEAD and not self._url and not self._head_bytes:
            self._transport.close()  # connected and said nothing
        else:
            part, limit = (("headers", self._limits.head_timeout_s) if self._phase == _HEAD
                           else ("body", self._limits.body_timeout_s))
            self._fail(HttpError(HTTPStatus.REQUEST_TIMEOUT,
                                 f"request {part} not received within {limit:g} s"))
        self._answer_queue()

    def _fail(self, error: HttpError) -> None:
        """Answer ``error`` after the requests before it, then close; read no more."""
        self._broken = True
        self._queue.append(error)
        self._pause()

    # -- answering --------------------------------------------------------------------

    def _answer_queue(self) -> None:
        transport = self._transport
        while self._queue and not self._busy:
            if transport is None or transport.is_closing():
                return
            item = self._queue.popleft()
            if isinstance(item, HttpError):
                if item.status < 500:
                    self._server.count_client_error()
                self._write(item.response(), close=True)
                return
            try:
                result = self._handler(item)
            except Exception:
                log.exception("the endpoint failed on a request")
                result = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "the agent failed").response()
            if isinstance(result, Response):
                self._write(result, close=not item.keep_alive)
                continue
            self._busy = True
            self._pause()
            future = self._server.run_in_pool(result)
            future.add_done_callback(lambda done, keep=item.keep_alive: self._answered(done, keep))
            return
        if self._paused:
            self._resume_if_ready()

    def _answered(self, future: asyncio.Future[Response], keep_alive: bool) -> None:
        self._busy = False
        if self._transport is None or self._transport.is_closing():
            return
        try:
            response = future.result()
        except Exception:
            log.exception("the endpoint failed on a request")
            response = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "the agent failed").response()
        self._write(response, close=not keep_alive)
        if self._phase == _IDLE and self._admitted:  # idle from now, not from the request
            self._deadline = time.monotonic() + self._limits.idle_timeout_s
        self._answer_queue()

    def _write(self, response: Response, close: bool) -> None:
        transport = self._transport
        assert transport is not None
        status, body, content_type, extra = response
        if time.time() >= _date[0]:
            _refresh_date()
        head = b"%s%sContent-Type: %s\r\nContent-Length: %d\r\n" % (
            _STATUS_LINES[status], _date[1], content_type.encode("latin-1"), len(body))
        if extra:
            head += "".join(f"{name}: {value}\r\n" for name, value in extra).encode("latin-1")
        head += b"Connection: close\r\n\r\n" if close else b"\r\n"
        if len(body) < 256 * 1024:
            transport.write(head + body)  # one send: the client wakes up once
        else:
            transport.write(head)
            transport.write(body)
        if close:
            self._linger()

    def _linger(self) -> None:
        """Close after the last answer without losing it. Closing a socket with unread
        request bytes makes the kernel send a reset, and a client that is still sending
        then loses the answer with it (as a refusal before the body is read would). So:
        send FIN after the answer, read and drop what the client still sends (a bounded
        amount, for :data:`LINGER_S` at most) and close when it closes."""
        transport = self._transport
        assert transport is not None
        self._broken = self._lingering = True
        self._queue.clear()
        self._linger_left = DISCARD_FACTOR * self._limits.max_body_bytes
        self._deadline = time.monotonic() + LINGER_S
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()


def _refuse_content_length(value: bytes, seen: int | None) -> NoReturn:
    """Content-Length is ASCII digits, given once. Anything else could make this server and
    a proxy in front of it disagree about where the body ends."""
    if seen is not None:
        raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length given more than once")
    raise HttpError(HTTPStatus.BAD_REQUEST,
                    f"Content-Length {value[:40].decode('latin-1')!r} is not a number of bytes")


_new_tuple = tuple.__new__
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}
_date: list = [0.0, b""]  # the Date header line, and when it next changes


def _refresh_date() -> None:
    now = int(time.time())
    _date[:] = [now + 1.0, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()]


def _listening_socket(address: tuple[str, int] | None, socket_path: Path | None) -> socket.socket:
    if socket_path is None:
        assert address is not None
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        return socket.create_server(address, family=family, backlog=128)
    if socket_path.is_socket():
        socket_path.unlink()  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(socket_path))
        os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves ``handler`` on a TCP address or a Unix socket from its own loop thread.

    The socket is bound by the constructor, so a taken port fails at start-up."""

    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits,
        *,
        address: tuple[str, int] | None = None,
        socket_path: Path | None = None,
        pool_threads: int = 4,
        on_client_error: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self.handler = handler
        self._on_client_error = on_client_error
        self._socket_path = socket_path
        self._sock = _listening_socket(address, socket_path)
        self.address = self._sock.getsockname()
        self._pool = concurrent.futures.ThreadPoolExecutor(pool_threads, "endpoint-infer")
        self._connections: set[_Connection] = set()
        self._served = 0
        self._tick = min(1.0, max(0.02, min(
            limits.head_timeout_s, limits.body_timeout_s, limits.idle_timeout_s,
            limits.refused_timeout_s) / 10))
        self._sweeping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="endpoint", daemon=True)
        self._started = threading.Event()
        self._failed: Exception | None = None
        self._stopped: asyncio.Event | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    def stop(self) -> None:
        if self._thread.is_alive():
            stopped = self._stopped
            assert stopped is not None
            self._loop.call_soon_threadsafe(stopped.set)
            self._thread.join(10)
        else:
            self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._socket_path is not None:
            with contextlib.suppress(OSError):
                self._socket_path.unlink()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except Exception as exc:  # before serving: start() raises it; after: logged
            self._failed = exc
            if self._started.is_set():
                log.exception("the inference endpoint stopped")
        finally:
            self._started.set()
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self._socket_path is None:
            server = await loop.create_server(lambda: _Connection(self), sock=self._sock)
        else:
            server = await loop.create_unix_server(lambda: _Connection(self), sock=self._sock)
        self._started.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                if connection._transport is not None:
                    connection._transport.abort()
            await server.wait_closed()

    # -- for connections --------------------------------------------------------------

    def admit(self, connection: _Connection) -> bool:
        """Track ``connection``; True if it is served, False if it is over the limit."""
        self._connections.add(connection)
        if not self._sweeping:
            self._sweeping = True
            self._loop.call_later(self._tick, self._sweep)
        if self._served >= self.limits.max_connections:
            return False
        self._served += 1
        return True

    def forget(self, connection: _Connection, admitted: bool) -> None:
        self._connections.discard(connection)
        if admitted:
            self._served -= 1

    def run_in_pool(self, work: Callable[[], Response]) -> asyncio.Future[Response]:
        return self._loop.run_in_executor(self._pool, work)

    def count_client_error(self) -> None:
        if self._on_client_error is not None:
            self._on_client_error()

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections):
            connection.check_deadline(now)
        if self._connections:
            self._loop.call_later(self._tick, self._sweep)
        else:
            self._sweeping = False
