"""The local inference endpoint over real HTTP (TCP and a Unix socket), real onnxruntime.

The model comes from a real bundle unpacked into a slot and health-checked, exactly as the
daemon loads it. Hostile requests are written byte by byte on raw sockets (a client library
would refuse to send them); after each, a new connection must still get a right answer.
"""

from __future__ import annotations

import io
import logging
import socket
import stat
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.endpoint import REFUSED_TIMEOUT_S, EndpointTimeouts, InferenceEndpoint
from agent.health import open_checked_engine
from agent.installer import LoadedModel
from agent.runtime import load_engine
from agent.serving import ModelHost
from tests.fixtures.models import (
    build_mlp_onnx,
    mlp_reference,
)
from tests.fixtures.waiting import wait_until


@pytest.fixture
def loaded(make_bundle, tmp_path) -> LoadedModel:
    built = make_bundle(version=4, seed=0)
    manifest = extract_bundle(built.path, tmp_path / "slot", 1 << 26)
    return LoadedModel("a", manifest, open_checked_engine(tmp_path / "slot", manifest))


@pytest.fixture
def weights(tmp_path):
    return build_mlp_onnx(tmp_path / "ref.onnx", seed=0)


LIMIT = 64 * 1024
QUICK = EndpointTimeouts(head_s=0.5, body_s=0.5, idle_s=0.5, refused_s=0.5)


@dataclass
class Served:
    endpoint: InferenceEndpoint
    host: ModelHost

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.endpoint.where.removeprefix("http://").rpartition(":")
        return host, int(port)


def _serve(loaded: LoadedModel, **options) -> Iterator[Served]:
    host = ModelHost()
    host.swap(loaded)
    endpoint = InferenceEndpoint(host, address=("127.0.0.1", 0), max_request_bytes=LIMIT,
                                 **options).start()
    try:
        yield Served(endpoint, host)
    finally:
        endpoint.stop()
        host.close()


@pytest.fixture
def served(loaded) -> Iterator[Served]:
    yield from _serve(loaded)


@pytest.fixture
def quick(loaded) -> Iterator[Served]:
    """Deadlines of half a second, so a test of them takes about that."""
    yield from _serve(loaded, timeouts=QUICK)


@pytest.fixture
def endpoint(served):
    with httpx.Client(base_url=served.endpoint.where, timeout=10) as client:
        yield client, served.host


def test_json_request_matches_the_numpy_reference(endpoint, weights):
    client, _ = endpoint
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    response = client.post("/v1/infer", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "detector", "version": 4}
    np.testing.assert_allclose(body["outputs"]["y"], mlp_reference(weights, x), atol=1e-5)


def test_npy_request_and_npy_answer(endpoint, weights):
    client, _ = endpoint
    x = np.random.default_rng(4).normal(size=(256, 4)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x)
    response = client.post("/v1/infer", content=buffer.getvalue(),
                           headers={"Content-Type": "application/x-npy",
                                    "Accept": "application/x-npy"})
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "4"
    y = np.load(io.BytesIO(response.content), allow_pickle=False)
    np.testing.assert_allclose(y, mlp_reference(weights, x), atol=1e-5)


def test_expect_100_continue_is_answered_before_the_body(endpoint, weights):
    """curl sends ``Expect: 100-continue`` for large bodies and waits for the interim
    answer; responses are buffered, so that one must be flushed on its own."""
    client, _ = endpoint
    x = np.ones((2, 4), np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x)
    body = buffer.getvalue()
    host, port = str(client.base_url.host), client.base_url.port
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(
            f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
            f"Accept: application/x-npy\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 100")  # within the 5 s timeout
        assert reader.readline() == b"\r\n"
        raw.sendall(body)
        assert reader.readline().startswith(b"HTTP/1.1 200")
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        answer = reader.read(int(headers["content-length"]))
    y = np.load(io.BytesIO(answer), allow_pickle=False)
    np.testing.assert_allclose(y, mlp_reference(weights, x), atol=1e-5)


def test_nan_where_the_schema_allows_it_is_null_in_json_and_exact_in_npy(loaded, tmp_path):
    """JSON has no NaN: a JSON answer says null, an .npy answer carries the NaN itself. The
    request may use the NaN word Python's json writes."""
    allows_nan = LoadedModel("a", loaded.manifest, load_engine(tmp_path / "slot" / "model.onnx"))
    loaded.engine.close()
    host = ModelHost()
    host.swap(allows_nan)
    server = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
    body = b'{"inputs": [[NaN, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]}'
    try:
        with httpx.Client(base_url=server.where, timeout=10) as client:
            as_json = client.post("/v1/infer", content=body,
                                  headers={"Content-Type": "application/json"})
            as_npy = client.post("/v1/infer", content=body,
                                 headers={"Content-Type": "application/json",
                                          "Accept": "application/x-npy"})
    finally:
        server.stop()
        host.close()

    assert as_json.status_code == 200, as_json.text
    first, second = as_json.json()["outputs"]["y"]
    assert first == [None, None, None] and all(isinstance(v, float) for v in second)
    exact = np.load(io.BytesIO(as_npy.content), allow_pickle=False)
    assert np.isnan(exact[0]).all() and np.allclose(exact[1], second)


def test_model_description(endpoint):
    client, _ = endpoint
    model = client.get("/v1/model").json()
    assert (model["name"], model["version"], model["runtime"]) == ("detector", 4, "onnx")
    assert model["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [None, 4],
                                  "allow_nan": False}
    assert client.get("/healthz").json() == {"status": "ok", "model": True}


BAD_REQUESTS = {
    "wrong_dtype": ({"json": {"inputs": [["a", "b", "c", "d"]]}}, 422, "expected dtype float32"),
    "wrong_shape": ({"json": {"inputs": [[[1.0, 2.0, 3.0, 4.0]]]}}, 422, "rank 3, expected 2"),
    "wrong_feature_count": ({"json": {"inputs": [[1.0, 2.0, 3.0]]}}, 422,
                            "feature count 3, expected 4"),
    "nan_forbidden": ({"content": b'{"inputs": [[1.0, NaN, 3.0, 4.0]]}',
                       "headers": {"Content-Type": "application/json"}}, 422, "NaN"),
    "too_large": ({"json": {"inputs": [[1.0] * 4] * 5000}}, 413, "over the 65536-byte limit"),
    "malformed_json": ({"content": b'{"inputs": [[1.0,', "headers":
                        {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    "deeply_nested": ({"content": b'{"inputs": ' + b"[" * 1500 + b"]" * 1500 + b"}",
                       "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    "not_an_object": ({"json": [[1.0, 2.0, 3.0, 4.0]]}, 400, '{"inputs"'),
    "bad_npy": ({"content": b"not numpy", "headers": {"Content-Type": "application/x-npy"}},
                400, "not a valid application/x-npy"),
    "content_type": ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415,
                     "Content-Type 'text/plain'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx_and_the_agent_keeps_serving(endpoint, case):
    client, host = endpoint
    request, status, message = BAD_REQUESTS[case]
    response = client.post("/v1/infer", **request)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text
    fresh = client.post("/v1/infer", json={"inputs": [[0.0] * 4]})
    assert fresh.status_code == 200
    assert host.stats.snapshot()["inference_count"] >= 1


def test_no_model_yet_is_503():
    host = ModelHost()
    server = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
    try:
        response = httpx.post(f"{server.where}/v1/infer", json={"inputs": [[0.0] * 4]})
        assert response.status_code == 503 and "no model" in response.json()["error"]
        assert httpx.get(f"{server.where}/v1/model").status_code == 503
    finally:
        server.stop()


def test_unix_socket_endpoint(loaded, tmp_path, weights):
    host = ModelHost()
    host.swap(loaded)
    socket_path = tmp_path / "agent.sock"
    server = InferenceEndpoint(host, socket_path=socket_path).start()
    try:
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://agent") as client:
            x = np.ones((2, 4), np.float32)
            body = client.post("/v1/infer", json={"inputs": x.tolist()}).json()
        np.testing.assert_allclose(body["outputs"]["y"], mlp_reference(weights, x), atol=1e-5)
        assert body["model"]["version"] == 4
    finally:
        server.stop()
        host.close()


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_both_runtimes_answer_the_numpy_reference_through_the_endpoint(
    tflite_mlp, tmp_path, runtime
):
    """The same MLP as ONNX and as TFLite, each built into a bundle and served."""
    from fleet.bundle_build import build_bundle

    model = tflite_mlp.onnx_path if runtime == "onnx" else tflite_mlp.tflite_path
    built = build_bundle(model, name=f"mlp-{runtime}", version=1, out_dir=tmp_path)
    assert built.manifest.runtime == runtime
    manifest = extract_bundle(built.path, tmp_path / "slot", 1 << 26)
    host = ModelHost()
    host.swap(LoadedModel("a", manifest, open_checked_engine(tmp_path / "slot", manifest)))
    server = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
    try:
        x = np.random.default_rng(11).normal(size=(7, 4)).astype(np.float32)
        body = httpx.post(f"{server.where}/v1/infer", json={"inputs": x.tolist()}).json()
        np.testing.assert_allclose(
            body["outputs"]["y"], mlp_reference(tflite_mlp.weights, x), atol=1e-5
        )
        assert httpx.get(f"{server.where}/v1/model").json()["runtime"] == runtime
    finally:
        server.stop()
        host.close()


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_an_endpoint_reachable_from_other_hosts_is_logged_as_unauthenticated(
    caplog, host, warned
):
    server = InferenceEndpoint(ModelHost(), address=(host, 0))
    with caplog.at_level(logging.WARNING, logger="agent.endpoint"):
        server.start()
    server.stop()

    assert any("no authentication" in r.getMessage() for r in caplog.records) is warned


def test_a_silent_connection_over_the_limit_is_dropped_after_a_few_seconds(loaded):
    assert REFUSED_TIMEOUT_S <= 5  # the default; the test uses a shorter one
    host = ModelHost()
    server = InferenceEndpoint(host, address=("127.0.0.1", 0), max_connections=1,
                               timeouts=EndpointTimeouts(refused_s=0.5)).start()
    port = int(server.where.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in held.recv(4096)  # this one holds the only slot
            with socket.create_connection(("127.0.0.1", port)) as silent:
                silent.settimeout(10)
                started = time.monotonic()
                assert silent.recv(4096) == b""  # closed by the agent, unasked
                assert time.monotonic() - started < 5
    finally:
        server.stop()


def test_connections_over_the_limit_get_503_and_the_others_keep_working(loaded):
    host = ModelHost()
    host.swap(loaded)
    server = InferenceEndpoint(host, address=("127.0.0.1", 0), max_connections=2).start()
    request = {"json": {"inputs": [[0.0] * 4]}}
    clients = [httpx.Client(base_url=server.where, timeout=10) for _ in range(3)]
    try:
        for held in clients[:2]:  # keep-alive: each holds its connection open
            assert held.post("/v1/infer", **request).status_code == 200

        refused = clients[2].post("/v1/infer", **request)

        assert refused.status_code == 503
        assert "too many connections to the agent (limit 2)" in refused.json()["error"]
        assert refused.headers["Connection"] == "close"
        assert all(c.post("/v1/infer", **request).status_code == 200 for c in clients[:2])
        clients[0].close()  # frees its slot once the server sees the connection end
        wait_until(lambda: clients[2].post("/v1/infer", **request).status_code == 200,
                   timeout=10, what="a freed connection slot")
    finally:
        for client in clients:
            client.close()
        server.stop()
        host.close()


# -- hostile and broken requests, on raw sockets ------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the agent closed the connection after answering


def _read_answer(source: socket.socket | io.BufferedReader) -> Answer | None:
    """One HTTP answer; None if the agent closed without answering. Several answers on one
    connection must be read through one reader: it may buffer the next answer too."""
    reader = source.makefile("rb") if isinstance(source, socket.socket) else source
    status_line = reader.readline()
    if not status_line:
        return None
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    closed = False
    if headers.get("connection") == "close":
        closed = reader.read(1) == b""
    return Answer(int(status_line.split()[1]), headers, body, closed)


def _exchange(served: Served, *parts: bytes, timeout: float = 10) -> Answer | None:
    with socket.create_connection(served.address, timeout=timeout) as raw:
        for part in parts:
            try:
                raw.sendall(part)
            except (BrokenPipeError, ConnectionResetError):  # refused before all was sent
                break
        return _read_answer(raw)


def _head(length: str | None = None, *extra: str, content_type: str = "application/json",
          method: str = "POST", target: str = "/v1/infer") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: agent", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode("latin-1")


def _assert_still_serves(served: Served, weights=None) -> None:
    """A normal request on a new connection gets the right answer."""
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    with httpx.Client(base_url=served.endpoint.where, timeout=10) as client:
        response = client.post("/v1/infer", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    if weights is not None:
        np.testing.assert_allclose(response.json()["outputs"]["y"], mlp_reference(weights, x),
                                   atol=1e-5)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


JSON_BODY = b'{"inputs": [[0.0, 1.0, 2.0, 3.0]]}'


@pytest.mark.parametrize("length", ["-1", "+34", "1e3", "0x22", "34 34", "34, 34", "\xb2", ""])
def test_a_content_length_that_is_not_plain_digits_is_refused_400(served, weights, length):
    answer = _exchange(served, _head(length) + JSON_BODY + b"x" * 100_000)

    assert answer is not None and answer.status == 400, answer
    assert b"Content-Length" in answer.body
    assert answer.closed
    _assert_still_serves(served, weights)


@pytest.mark.parametrize("lengths", [("34", "34"), ("34", "35")], ids=["equal", "conflicting"])
def test_a_content_length_given_twice_is_refused_400(served, weights, lengths):
    head = _head(lengths[0], f"Content-Length: {lengths[1]}")
    answer = _exchange(served, head + JSON_BODY)

    assert answer is not None and answer.status == 400, answer
    assert b"Content-Length" in answer.body and answer.closed
    _assert_still_serves(served, weights)


def test_a_content_length_beside_chunked_is_refused_400(served, weights):
    answer = _exchange(served, _head("34", "Transfer-Encoding: chunked") + b"22\r\n"
                       + JSON_BODY + b"\r\n0\r\n\r\n")

    assert answer is not None and answer.status == 400, answer
    _assert_still_serves(served, weights)


def test_a_body_far_over_the_limit_is_refused_413_before_it_is_sent(served, weights):
    answer = _exchange(served, _head(str(100 * 1024 * 1024)))  # the head only

    assert answer is not None and answer.status == 413, answer
    error = answer.body.decode()
    assert "over the 65536-byte limit" in error
    assert "--max-request-mb" in error and ".npy" in error
    assert answer.closed
    _assert_still_serves(served, weights)


def test_a_body_a_little_over_the_limit_is_read_and_refused_413(served, weights):
    body = b"[" * (LIMIT + 10)
    answer = _exchange(served, _head(str(len(body))), body)

    assert answer is not None and answer.status == 413 and answer.closed, answer
    _assert_still_serves(served, weights)


def test_expect_100_continue_over_the_limit_is_refused_without_continue(served, weights):
    answer = _exchange(served, _head(str(LIMIT + 1), "Expect: 100-continue"))

    assert answer is not None and answer.status == 413, answer  # not 100 first
    _assert_still_serves(served, weights)


def _chunked(body: bytes, size: int) -> bytes:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def test_a_chunked_body_within_the_limit_is_served(served, weights):
    x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    body = _npy(x)
    answer = _exchange(served, _head(None, "Transfer-Encoding: chunked", "Accept: application/"
                                     "x-npy", content_type="application/x-npy"),
                       _chunked(body, 50))

    assert answer is not None and answer.status == 200, answer
    y = np.load(io.BytesIO(answer.body), allow_pickle=False)
    np.testing.assert_allclose(y, mlp_reference(weights, x), atol=1e-5)


def test_a_chunked_body_over_the_limit_is_refused_413(served, weights):
    answer = _exchange(served, _head(None, "Transfer-Encoding: chunked"),
                       _chunked(b" " * (2 * LIMIT), 16 * 1024))

    assert answer is not None and answer.status == 413, answer
    assert b"chunked request body is over the 65536-byte limit" in answer.body
    _assert_still_serves(served, weights)


def _deflated_zip(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def _peak_bytes_of(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOMB_NPY = _npy(np.zeros(12 * 1024 * 1024, np.float32))  # 48 MB, ~47 KB deflated


def test_an_npz_bomb_is_refused_413_before_it_is_inflated(served, weights):
    bomb = _deflated_zip("x.npy", BOMB_NPY)
    assert len(bomb) < LIMIT

    answer, peak = _peak_bytes_of(lambda: _exchange(
        served, _head(str(len(bomb)), content_type="application/x-npz"), bomb))

    assert answer is not None and answer.status == 413, answer
    assert b"declare" in answer.body and b"uncompressed" in answer.body
    assert peak < 8 * 1024 * 1024  # the 48 MB were never allocated
    _assert_still_serves(served, weights)


def test_an_npz_member_lying_about_its_size_is_read_only_as_far_as_it_says(served, weights):
    """Declares 1000 bytes, inflates to 48 MB: reading stops at 1000, the CRC fails."""
    bomb = bytearray(_deflated_zip("x.npy", BOMB_NPY))
    central = bomb.index(b"PK\x01\x02")
    struct.pack_into("<I", bomb, 22, 1000)  # local header: uncompressed size
    struct.pack_into("<I", bomb, central + 24, 1000)  # central directory: the same

    answer, peak = _peak_bytes_of(lambda: _exchange(
        served, _head(str(len(bomb)), content_type="application/x-npz"), bytes(bomb)))

    assert answer is not None and answer.status == 400, answer
    assert b"not a valid application/x-npz" in answer.body
    assert peak < 8 * 1024 * 1024
    _assert_still_serves(served, weights)


UNDECODABLE = {
    "json_5000_digit_integer": ("application/json",
                                b'{"inputs": [[' + b"9" * 5000 + b", 1, 2, 3]]}",
                                "malformed JSON"),
    "corrupt_npz": ("application/x-npz", b"PK\x03\x04" + b"\x00" * 200, "not a readable .npz"),
    "npy_header_claims_4e12_elements": (
        "application/x-npy",
        _npy(np.zeros(4, np.float32)).replace(b"(4,)", b"(4000000000000,)"),
        "declares shape (4000000000000,)"),
    "npz_in_bzip2": ("application/x-npz", b"", "compression"),  # built in the test
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_a_body_that_cannot_be_decoded_is_a_400_with_a_reason(served, weights, case):
    content_type, body, reason = UNDECODABLE[case]
    if case == "npz_in_bzip2":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
            archive.writestr("x.npy", _npy(np.ones((1, 4), np.float32)))
        body = buffer.getvalue()

    answer = _exchange(served, _head(str(len(body)), content_type=content_type), body)

    assert answer is not None and answer.status == 400, answer
    assert reason in answer.body.decode(), answer.body
    assert "Traceback" not in answer.body.decode()
    _assert_still_serves(served, weights)


def test_an_npz_body_gives_the_numpy_reference(served, weights):
    x = np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x)
    with httpx.Client(base_url=served.endpoint.where, timeout=10) as client:
        response = client.post("/v1/infer", content=buffer.getvalue(),
                               headers={"Content-Type": "application/x-npz"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"]["y"], mlp_reference(weights, x),
                               atol=1e-5)


@pytest.mark.parametrize(("method", "target", "allow"), [
    ("PUT", "/v1/infer", "POST"), ("GET", "/v1/infer", "POST"), ("DELETE", "/healthz", "GET"),
    ("POST", "/v1/model", "GET"),
])
def test_an_unsupported_method_is_405_with_allow(served, weights, method, target, allow):
    answer = _exchange(served, _head("0", method=method, target=target))

    assert answer is not None and answer.status == 405, answer
    assert answer.headers["allow"] == allow
    _assert_still_serves(served, weights)


def test_an_unknown_route_is_404(served):
    answer = _exchange(served, _head("0", method="GET", target="/v2/nothing"))
    assert answer is not None and answer.status == 404 and b"/v2/nothing" in answer.body


@pytest.mark.parametrize("case", ["one_huge_header", "too_many_headers"])
def test_oversized_headers_are_refused_431(served, weights, case):
    extra = (["X-Big: " + "a" * 100_000] if case == "one_huge_header"
             else [f"X-{i}: y" for i in range(200)])
    answer = _exchange(served, _head("34", *extra) + JSON_BODY)

    assert answer is not None and answer.status == 431, answer
    _assert_still_serves(served, weights)


def test_a_head_that_never_ends_is_refused_431_once_it_passes_the_limit(served, weights):
    """Nothing to parse to the end: the bytes read for the head are what is bounded."""
    with socket.create_connection(served.address, timeout=10) as raw:
        raw.sendall(b"POST /v1/infer HTTP/1.1\r\nX-Endless: ")
        answer = None
        for _ in range(100):  # 1.6 MB at most; refused after 64 KiB
            try:
                raw.sendall(b"a" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                break
            raw.settimeout(0.05)
            try:
                answer = _read_answer(raw)
                break
            except TimeoutError:
                continue
        if answer is None:
            raw.settimeout(10)
            answer = _read_answer(raw)
    assert answer is not None and answer.status == 431, answer
    _assert_still_serves(served, weights)


def test_a_malformed_request_line_is_400(served, weights):
    answer = _exchange(served, b"HELLO THERE\r\n\r\n")
    assert answer is not None and answer.status == 400 and answer.closed, answer
    _assert_still_serves(served, weights)


def test_pipelined_requests_are_answered_in_order(served, weights):
    first = np.ones((1, 4), np.float32)
    second = np.full((2, 4), 2.0, np.float32)
    bodies = [_npy(first), _npy(second)]
    data = b"".join(_head(str(len(b)), "Accept: application/x-npy",
                          content_type="application/x-npy") + b for b in bodies)
    with socket.create_connection(served.address, timeout=10) as raw:
        raw.sendall(data + _head(None, method="GET", target="/healthz"))
        reader = raw.makefile("rb")
        answers = [_read_answer(reader) for _ in range(3)]
    for answer, x in zip(answers[:2], (first, second), strict=True):
        assert answer is not None and answer.status == 200
        np.testing.assert_allclose(np.load(io.BytesIO(answer.body)),
                                   mlp_reference(weights, x), atol=1e-5)
    assert answers[2] is not None and b'"status":"ok"' in answers[2].body


# -- deadlines ---------------------------------------------------------------------------


def _closed_within(raw: socket.socket, seconds: float) -> tuple[Answer | None, float]:
    started = time.monotonic()
    raw.settimeout(seconds)
    answer = _read_answer(raw)
    return answer, time.monotonic() - started


def test_slow_headers_get_408_and_free_their_slot(loaded, weights):
    for served in _serve(loaded, timeouts=QUICK, max_connections=1):
        with socket.create_connection(served.address) as slow:
            slow.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: agent\r\n")  # and no more
            answer, took = _closed_within(slow, 10)
        assert answer is not None and answer.status == 408, answer
        assert b"headers not received within 0.5 s" in answer.body and answer.closed
        assert took < 5
        # the only connection slot is free again
        wait_until(lambda served=served: _exchange(served, _head(None, method="GET",
                                                   target="/healthz")).status == 200,
                   timeout=10, what="the slot held by the slow client")
        _assert_still_serves(served, weights)


def test_a_connection_that_says_nothing_is_closed_at_the_head_deadline(quick, weights):
    with socket.create_connection(quick.address) as silent:
        answer, took = _closed_within(silent, 10)
    assert answer is None and took < 5
    _assert_still_serves(quick, weights)


def test_a_slow_body_gets_408(quick, weights):
    with socket.create_connection(quick.address) as slow:
        slow.sendall(_head("34") + JSON_BODY[:10])
        answer, took = _closed_within(slow, 10)
    assert answer is not None and answer.status == 408, answer
    assert b"body not received within 0.5 s" in answer.body and took < 5
    _assert_still_serves(quick, weights)


def test_an_idle_kept_alive_connection_is_closed(quick, weights):
    with socket.create_connection(quick.address) as idle:
        idle.sendall(_head("34") + JSON_BODY)
        first = _read_answer(idle)
        assert first is not None and first.status == 200 and not first.closed
        answer, took = _closed_within(idle, 10)
    assert answer is None and took < 5  # closed without a word
    _assert_still_serves(quick, weights)


# -- counting client errors ----------------------------------------------------------------


def test_requests_that_do_not_fit_the_model_are_client_errors_not_model_errors(endpoint):
    client, host = endpoint
    for _ in range(3):
        response = client.post("/v1/infer", json={"inputs": [[1.0, 2.0, 3.0]]})
        assert response.status_code == 422
    snapshot = host.stats.snapshot()
    assert snapshot["error_count"] == 0
    assert snapshot["client_error_count"] == 3


def test_every_refused_request_is_counted_once_as_a_client_error(served):
    refused = [
        _head("12") + b'{"inputs": [',  # 400 malformed JSON
        _head(str(LIMIT + 1)) + b" " * (LIMIT + 1),  # 413 by Content-Length
        _head("1", content_type="text/plain") + b"x",  # 415
        _head(None),  # 411
        _head("-1"),  # 400 from the HTTP layer
        _head("0", method="PUT"),  # 405
        _head("0", method="GET", target="/nowhere"),  # 404
        _head("34") + b'{"inputs": [[1.0, 2.0, 3.0]]}     ',  # 422, counted by ModelHost
    ]
    for request in refused:
        answer = _exchange(served, request)
        assert answer is not None and 400 <= answer.status < 500, (request, answer)
    snapshot = served.host.stats.snapshot()
    assert snapshot["client_error_count"] == len(refused)
    assert snapshot["error_count"] == 0 and snapshot["inference_count"] == 0


# -- where inference runs -----------------------------------------------------------------


def test_inference_in_the_thread_pool_answers_the_same(loaded, weights):
    """inline_budget_s=0 sends every inference to the pool."""
    for served in _serve(loaded, inline_budget_s=0.0):
        x = np.random.default_rng(9).normal(size=(8, 4)).astype(np.float32)
        with httpx.Client(base_url=served.endpoint.where, timeout=10) as client:
            as_json = client.post("/v1/infer", json={"inputs": x.tolist()})
            as_npy = client.post("/v1/infer", content=_npy(x),
                                 headers={"Content-Type": "application/x-npy",
                                          "Accept": "application/x-npy"})
            misfit = client.post("/v1/infer", json={"inputs": [[1.0]]})
        np.testing.assert_allclose(as_json.json()["outputs"]["y"], mlp_reference(weights, x),
                                   atol=1e-5)
        np.testing.assert_allclose(np.load(io.BytesIO(as_npy.content)),
                                   mlp_reference(weights, x), atol=1e-5)
        assert misfit.status_code == 422
        assert served.host.stats.snapshot()["client_error_count"] == 1


def test_the_unix_socket_is_group_read_write_only(loaded, tmp_path):
    socket_path = tmp_path / "agent.sock"
    server = InferenceEndpoint(ModelHost(), socket_path=socket_path).start()
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
    finally:
        server.stop()
