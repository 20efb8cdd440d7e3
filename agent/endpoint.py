"""The local inference endpoint: HTTP for applications on the device.

Standard library only (``http.server``): the agent stays small on the device, and the
transport costs are the kernel's, not a framework's. HTTP/1.1 keep-alive, a thread per
connection. Routes:

* ``POST /v1/infer``: ``application/json`` body ``{"inputs": [...]}`` or
  ``{"inputs": {"name": [...]}}``; or ``application/x-npy`` (one array, single-input models)
  / ``application/x-npz`` (arrays by input name). The answer is JSON
  ``{"model": {"name", "version"}, "outputs": {...}}``, or ``.npy`` bytes of the single
  output when the request says ``Accept: application/x-npy`` (headers carry the model).
  JSON has no NaN or infinity: in JSON answers they are ``null`` (ask for ``.npy`` to get
  them exactly); in JSON requests the ``NaN``/``Infinity`` words Python writes are read.
* ``GET /v1/model``: active name, version, runtime, slot and schemas.
* ``GET /healthz``.

Errors are JSON ``{"error": "..."}`` with 400 (malformed body), 404, 411/413 (length),
415 (content type), 422 (input does not fit the model), 503 (no model yet, or too many
connections), 500 (the runtime failed). Never a stack trace to the client; the agent keeps
serving.

Bounded: at most ``max_connections`` connections are served at once (a thread each). One
more is answered 503 and closed as soon as it sends its request, and dropped after
``REFUSED_TIMEOUT_S`` if it sends nothing, so the threads an application leaking
connections can pile up live seconds, not forever. A served connection idle for
``IDLE_TIMEOUT_S`` is closed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent.npy import dump_npy, load_npy
from agent.runtime import EngineError, InputError
from agent.serving import ModelHost, NoModelError

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "InferenceEndpoint"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 120.0
REFUSED_TIMEOUT_S = 5.0
NPY = "application/x-npy"
NPZ = "application/x-npz"


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the second waits for the
    # client's delayed ACK: 40 ms per keep-alive request. TCP_NODELAY removes that.
    disable_nagle_algorithm = True
    # Buffered writes: status line, headers and body leave in one send, flushed by
    # http.server after each request. Unbuffered, headers and body are two sends, and the
    # client wakes up twice per response (on a VM, each wake-up costs tens of us).
    wbufsize = 256 * 1024
    server_version = "edgefleet-agent"
    timeout = IDLE_TIMEOUT_S  # socket timeout: an idle keep-alive connection is closed
    host: ModelHost
    max_request_bytes: int
    connection_slots: threading.BoundedSemaphore
    max_connections: int

    # -- plumbing ---------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self._admitted = self.connection_slots.acquire(blocking=False)
        if not self._admitted:  # it only gets to say its request, then the 503
            self.connection.settimeout(REFUSED_TIMEOUT_S)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._admitted:
                self.connection_slots.release()

    def parse_request(self) -> bool:
        """A connection over the limit gets one 503 (after its body is read) and is closed."""
        if not super().parse_request():
            return False
        if self._admitted:
            return True
        self.close_connection = True
        length = self.headers.get("Content-Length", "")
        if length.isdigit():
            self._discard(int(length))
        message = (f"too many connections to the agent (limit {self.max_connections}); "
                   "reuse a connection or retry")
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, _json_encoder.encode({"error": message}),
                   "application/json", Connection="close")
        return False

    def handle_expect_100(self) -> bool:
        """The client waits for this before sending the body: it cannot sit in the buffer."""
        accepted = super().handle_expect_100()
        self.wfile.flush()
        return accepted

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "unix"

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, _json_encoder.encode(payload), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if size > self.max_request_bytes:
            self._discard(size)
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {size} bytes is over the {self.max_request_bytes}-byte limit",
            )
        return self.rfile.read(size)

    def _discard(self, size: int) -> None:
        """Read a refused body so the client sees our 413, not a reset; a body far over the
        limit is not worth reading: close the connection instead."""
        if size > 8 * self.max_request_bytes:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:
                break
            size -= len(chunk)

    # -- routes -----------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._json(HTTPStatus.OK, {"status": "ok", "model": self.host.current is not None})
        elif self.path == "/v1/model":
            described = self.host.describe()
            if described is None:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no model is installed yet")
            else:
                self._json(HTTPStatus.OK, described)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:
        if self.path != "/v1/infer":
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            return
        try:
            inputs = self._parse_inputs()
            outputs, model = self.host.infer(inputs)
        except _RequestError as exc:
            self._error(exc.status, str(exc))
            return
        except InputError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
            return
        except NoModelError as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
            return
        except EngineError as exc:
            log.error("inference failed: %s", exc)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed: {exc}")
            return
        name, version = model.manifest.name, model.manifest.version
        if self.headers.get("Accept") == NPY and len(outputs) == 1:
            self._send(HTTPStatus.OK, dump_npy(next(iter(outputs.values()))), NPY,
                       X_Model_Name=name, X_Model_Version=str(version))
            return
        self._json(HTTPStatus.OK, {
            "model": {"name": name, "version": version},
            "outputs": {key: value.tolist() for key, value in outputs.items()},
        })

    def _parse_inputs(self) -> Any:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        body = self._body()
        if content_type in ("application/json", ""):
            document = _decode_json(body)
            if not isinstance(document, dict) or "inputs" not in document:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST,
                    'JSON body must be {"inputs": [...]} or {"inputs": {"name": [...]}}',
                )
            return document["inputs"]
        if content_type in (NPY, NPZ):
            try:
                loaded = load_npy(body)
            except (ValueError, OSError, EOFError) as exc:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST, f"body is not a valid {content_type}: {exc}"
                ) from None
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {name: loaded[name] for name in loaded.files}
            return loaded
        raise _RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r}: use application/json, {NPY} or {NPZ}",
        )


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


def _decode_json(body: bytes) -> Any:
    """msgspec first (a tenth of the json module's time for arrays of numbers); what it
    refuses goes to the json module, which also reads the NaN and Infinity that Python's
    json.dumps writes (then refused or not by the model's NaN policy), and which words the
    error when the body really is malformed."""
    try:
        return _json_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):  # deep nesting raises the latter
        pass
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler expects a (host, port)-like address
        request, _ = super().get_request()
        return request, ("unix", 0)


class InferenceEndpoint:
    """Serves :class:`ModelHost` on ``host:port`` (TCP) or a Unix socket path."""

    def __init__(
        self,
        host: ModelHost,
        *,
        address: tuple[str, int] | None = None,
        socket_path: Path | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if (address is None) == (socket_path is None):
            raise ValueError("give exactly one of address or socket_path")
        handler = type("Handler", (_Handler,), {
            "host": host,
            "max_request_bytes": max_request_bytes,
            "connection_slots": threading.BoundedSemaphore(max_connections),
            "max_connections": max_connections,
            "disable_nagle_algorithm": socket_path is None,  # TCP_NODELAY is TCP only
        })
        self._exposed = address is not None and not _is_loopback(address[0])
        if socket_path is not None:
            if socket_path.exists():
                socket_path.unlink()  # a stale socket from a previous run
            self._server: socketserver.BaseServer = _UnixHTTPServer(str(socket_path), handler)
            os.chmod(socket_path, 0o660)
            self.where = f"unix:{socket_path}"
        else:
            server = ThreadingHTTPServer(address, handler)
            server.daemon_threads = True
            self._server = server
            self.where = f"http://{address[0]}:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="endpoint", daemon=True
        )

    def start(self) -> InferenceEndpoint:
        self._thread.start()
        log.info("inference endpoint on %s", self.where)
        if self._exposed:
            log.warning(
                "inference endpoint %s is reachable from other hosts and has no "
                "authentication: anyone on that network can run the model and read its "
                "schema; listen on 127.0.0.1 or a Unix socket unless that is intended",
                self.where,
            )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
