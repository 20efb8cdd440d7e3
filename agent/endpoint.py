"""The local inference endpoint: HTTP for applications on the device.

Routes:

* ``POST /v1/infer``: ``application/json`` body ``{"inputs": [...]}`` or
  ``{"inputs": {"name": [...]}}``; or ``application/x-npy`` (one array, single-input models)
  / ``application/x-npz`` (arrays by input name). The answer is JSON
  ``{"model": {"name", "version"}, "outputs": {...}}`` by default. ``Accept:
  application/x-npy`` gets the ``.npy`` bytes of the single output, and, for a model with
  several outputs, an ``.npz`` of them by output name (``application/x-npz``, which
  ``np.load`` reads as well: one ``.npy`` cannot hold several arrays, and a client asking
  for binary wants the exact values JSON cannot carry). ``Accept: application/x-npz``
  always gets an ``.npz``. Binary answers carry the model in ``X-Model-Name`` /
  ``X-Model-Version`` headers. An ``Accept`` none of JSON, ``.npy`` or ``.npz`` satisfies
  (``*/*`` and ``application/*`` do) is refused 406 before the model runs.
  JSON has no NaN or infinity: in JSON answers they are ``null`` (ask for ``.npy`` to get
  them exactly); in JSON requests the ``NaN``/``Infinity`` words Python writes are read.
* ``GET /v1/model``: active name, version, runtime, slot and schemas.
* ``GET /healthz``.

Errors are JSON ``{"error": "..."}``: 400 (malformed request or body), 404, 405 (with
``Allow``), 408 (too slow), 411/413 (length), 415 (content type), 422 (the input does not
fit the model, or the runtime refused a value the schema allows: ``{"error", "input"}``,
the input named when known), 406 (``Accept``), 431 (headers too large), 503 (no model yet,
or too many connections), 500 (the runtime failed on an input it had no reason to refuse).
Never a stack trace to the client, never a connection closed without an answer; the agent
keeps serving. Every 4xx is counted once as a client error
(``InferenceStats.record_client_error``), never as a model error: rollouts halt on the
model error rate, and a buggy application must not make a good model look bad. The
requests :class:`ModelHost` refuses as not fitting the model it counts itself; the
endpoint counts the rest.

The HTTP layer (``agent.serve_http``: asyncio and httptools, with every size and time
limit) is apart from what is served here, so each can be read and tested on its own terms.

Where inference runs: on the event loop while it is cheap, in a thread pool when it is not.
A hand-off to a pool thread and back costs two thread wake-ups and a GIL exchange, tens of
microseconds on a small device: as much as a batch-1 inference of a small model, which is
what the device mostly serves. But an inference on the loop stalls every other connection
(health checks included) for its duration, and ONNX Runtime sessions run concurrently on
several cores only from several threads. So a request goes to the pool when its body is
large (decoding it takes time too) or when recent inferences took longer than
``inline_budget_s`` (1 ms by default: a stall short enough for the other clients, a
hand-off too dear for it). TFLite interpreters are not thread-safe: their engine
serialises ``invoke``, so in the pool their requests queue there, and the loop stays free.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec

from agent.npy import NpyError, NpyTooLargeError, dump_npy, dump_npz, load_array_body
from agent.runtime import EngineError, InputError, RejectedInputError
from agent.serve_http import HttpLimits, HttpServer, Request, Response
from agent.serving import ModelHost, NoModelError

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "EndpointTimeouts", "InferenceEndpoint"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_INLINE_BUDGET_S = 0.001
INLINE_MAX_BODY_BYTES = 256 * 1024
IDLE_TIMEOUT_S = 120.0
REFUSED_TIMEOUT_S = 5.0
NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
_NPY = NPY.encode()
_OK = HTTPStatus.OK.value
# What an answer may be, by Accept header (see _answer_format)
_AS_JSON, _AS_NPY, _AS_NPZ = "json", "npy", "npz"
TOO_LARGE_ADVICE = ("raise it with --max-request-mb, or send large batches as .npy "
                    f"({NPY}): a third of the size of the same numbers in JSON")


@dataclass(frozen=True)
class EndpointTimeouts:
    """Seconds each phase of a connection may take before it is closed."""

    head_s: float = 10.0  # request line and headers
    body_s: float = 60.0  # the body: 16 MB at ~2 Mbit/s
    idle_s: float = IDLE_TIMEOUT_S  # between requests on a kept-alive connection
    refused_s: float = REFUSED_TIMEOUT_S  # a connection over the limit, to say its request


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


def _json(status: int, payload: Any, *headers: tuple[str, str]) -> Response:
    return Response(status, _json_encoder.encode(payload), JSON, headers)


class _Routes:
    """The endpoint's application: one request in, one :class:`Response` out (or a function
    making it in the pool). Counts every 4xx it answers except those ModelHost counted."""

    def __init__(self, host: ModelHost, max_request_bytes: int, inline_budget_s: float) -> None:
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.inline_budget_s = inline_budget_s
        self.recent_infer_s = 0.0  # moving average of inference time; races are harmless
        self._get: dict[str, Callable[[], Response]] = {
            "/healthz": self._health, "/v1/model": self._model,
        }

    def __call__(self, request: Request) -> Response | Callable[[], Response]:
        path = request.target.partition("?")[0]
        if path == "/v1/infer":
            if request.method != "POST":
                return self._refuse(HTTPStatus.METHOD_NOT_ALLOWED,
                                    f"{request.method} {path}: use POST", ("Allow", "POST"))
            if (len(request.body) > INLINE_MAX_BODY_BYTES
                    or self.recent_infer_s > self.inline_budget_s):
                return partial(self._infer, request)
            return self._infer(request)
        route = self._get.get(path)
        if route is None:
            return self._refuse(HTTPStatus.NOT_FOUND, f"no route {path}")
        if request.method != "GET":
            return self._refuse(HTTPStatus.METHOD_NOT_ALLOWED,
                                f"{request.method} {path}: use GET", ("Allow", "GET"))
        return route()

    def _refuse(self, status: HTTPStatus, message: str, *headers: tuple[str, str]) -> Response:
        self.host.stats.record_client_error()
        return _json(status, {"error": message}, *headers)

    def _health(self) -> Response:
        return _json(HTTPStatus.OK, {"status": "ok", "model": self.host.current is not None})

    def _model(self) -> Response:
        described = self.host.describe()
        if described is None:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no model is installed yet"})
        return _json(HTTPStatus.OK, described)

    def _infer(self, request: Request) -> Response:
        accept = request.headers.get(b"accept")
        answer_as = _AS_NPY if accept == _NPY else _answer_format(accept)
        if answer_as is None:
            return self._refuse(
                HTTPStatus.NOT_ACCEPTABLE,
                f"Accept {accept.decode('latin-1')!r}: answers are {JSON}, {NPY} or {NPZ}",
            )
        try:
            inputs = self._parse_inputs(request)
        except _RequestError as exc:
            return self._refuse(exc.status, str(exc))
        started = time.perf_counter()
        try:
            outputs, model = self.host.infer(inputs)
        except RejectedInputError as exc:  # counted by ModelHost
            log.info("the model refused a request's input: %s", exc)
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc), "input": exc.input})
        except InputError as exc:  # counted by ModelHost
            return _json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)})
        except NoModelError as exc:
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except EngineError as exc:
            log.error("inference failed: %s", exc)
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the model failed: {exc}"})
        self.recent_infer_s = 0.8 * self.recent_infer_s + 0.2 * (time.perf_counter() - started)
        name, version = model.manifest.name, model.manifest.version
        if answer_as is not _AS_JSON:
            headers = (("X-Model-Name", name), ("X-Model-Version", str(version)))
            if answer_as is _AS_NPY and len(outputs) == 1:
                return Response(_OK, dump_npy(next(iter(outputs.values()))), NPY, headers)
            return Response(_OK, dump_npz(outputs), NPZ, headers)
        return Response(_OK, _json_encoder.encode({
            "model": {"name": name, "version": version},
            "outputs": {key: value.tolist() for key, value in outputs.items()},
        }), JSON)

    def _parse_inputs(self, request: Request) -> Any:
        headers = request.headers
        if b"content-length" not in headers and b"transfer-encoding" not in headers:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        content_type = _media_type(headers.get(b"content-type", b""))
        body = request.body
        if content_type in (JSON, ""):
            try:  # the common case inline; _decode_json tries again and explains
                document = _json_decoder.decode(body)
            except (msgspec.DecodeError, RecursionError):
                document = _decode_json(body)
            if not isinstance(document, dict) or "inputs" not in document:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST,
                    'JSON body must be {"inputs": [...]} or {"inputs": {"name": [...]}}',
                )
            return document["inputs"]
        if content_type in (NPY, NPZ):
            try:
                return load_array_body(body, self.max_request_bytes)
            except NpyTooLargeError as exc:
                raise _RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                    f"{exc} ({TOO_LARGE_ADVICE})") from None
            except NpyError as exc:
                raise _RequestError(
                    HTTPStatus.BAD_REQUEST, f"body is not a valid {content_type}: {exc}"
                ) from None
        raise _RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r}: use {JSON}, {NPY} or {NPZ}",
        )


@functools.lru_cache(maxsize=64)
def _answer_format(accept: bytes | None) -> str | None:
    """How to answer a request with this ``Accept`` header: JSON, ``.npy`` or ``.npz``, or
    None when it accepts none of them (406). The media ranges are read with their ``q``
    weights: the highest weighted of ours wins; on a tie a type named outright beats one a
    wildcard covers (``application/x-npy, */*`` is ``.npy``), then JSON (what a client that
    did not ask for binary expects). ``*/*`` and ``application/*`` accept JSON, ``q=0``
    refuses. No header, or an empty one: JSON. Cached: a client sends the same header."""
    if not accept or not accept.strip():
        return _AS_JSON
    ranked = dict.fromkeys((_AS_JSON, _AS_NPY, _AS_NPZ), (-1.0, 0))
    by_type = {JSON: _AS_JSON, NPY: _AS_NPY, NPZ: _AS_NPZ}
    for part in accept.decode("latin-1").split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media in by_type:
            answer, rank = by_type[media], (quality, 1)
        elif media in ("*/*", "application/*"):
            answer, rank = _AS_JSON, (quality, 0)
        else:
            continue
        ranked[answer] = max(ranked[answer], rank)
    best = max(ranked, key=lambda answer: (*ranked[answer], answer == _AS_JSON))
    return best if ranked[best][0] > 0 else None


@functools.lru_cache(maxsize=64)
def _media_type(header: bytes) -> str:
    """``application/json`` from ``Application/JSON; charset=utf-8``; a client sends the same
    few values, so each is worked out once."""
    return header.partition(b";")[0].strip().lower().decode("latin-1")


def _decode_json(body: bytes) -> Any:
    """msgspec first (a tenth of the json module's time for arrays of numbers); what it
    refuses goes to the json module, which also reads the NaN and Infinity that Python's
    json.dumps writes (then refused or not by the model's NaN policy), and which words the
    error when the body really is malformed. Every failure is the body's: ``ValueError``
    covers bad UTF-8, bad syntax and integers too long to convert (Python's 4300-digit
    limit), ``RecursionError`` deep nesting."""
    try:
        return _json_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class InferenceEndpoint:
    """Serves :class:`ModelHost` on ``host:port`` (TCP) or a Unix socket path (mode 0660).

    Bound by the constructor (a taken port fails at start-up); serving from :meth:`start`
    until :meth:`stop`."""

    def __init__(
        self,
        host: ModelHost,
        *,
        address: tuple[str, int] | None = None,
        socket_path: Path | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeouts: EndpointTimeouts | None = None,
        inline_budget_s: float = DEFAULT_INLINE_BUDGET_S,
    ) -> None:
        if (address is None) == (socket_path is None):
            raise ValueError("give exactly one of address or socket_path")
        timeouts = timeouts or EndpointTimeouts()
        limits = HttpLimits(
            max_body_bytes=max_request_bytes, max_connections=max_connections,
            head_timeout_s=timeouts.head_s, body_timeout_s=timeouts.body_s,
            idle_timeout_s=timeouts.idle_s, refused_timeout_s=timeouts.refused_s,
            too_large_advice=TOO_LARGE_ADVICE,
        )
        routes = _Routes(host, max_request_bytes, inline_budget_s)
        self._server = HttpServer(
            routes, limits, address=address, socket_path=socket_path,
            pool_threads=min(4, os.cpu_count() or 1),
            on_client_error=host.stats.record_client_error,
        )
        self._exposed = address is not None and not _is_loopback(address[0])
        if socket_path is not None:
            self.where = f"unix:{socket_path}"
        else:
            assert address is not None
            self.where = f"http://{address[0]}:{self._server.address[1]}"

    def start(self) -> InferenceEndpoint:
        self._server.start()
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
        self._server.stop()
