"""The local inference endpoint over real HTTP (TCP and a Unix socket), real onnxruntime.

The model comes from a real bundle unpacked into a slot and health-checked, exactly as the
daemon loads it.
"""

from __future__ import annotations

import io
import logging
import socket
import time

import httpx
import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.endpoint import REFUSED_TIMEOUT_S, InferenceEndpoint
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


@pytest.fixture
def endpoint(loaded):
    host = ModelHost()
    host.swap(loaded)
    server = InferenceEndpoint(host, address=("127.0.0.1", 0), max_request_bytes=64 * 1024)
    server.start()
    with httpx.Client(base_url=server.where, timeout=10) as client:
        yield client, host
    server.stop()
    host.close()


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
    host = ModelHost()
    server = InferenceEndpoint(host, address=("127.0.0.1", 0), max_connections=1).start()
    port = int(server.where.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in held.recv(4096)  # this one holds the only slot
            with socket.create_connection(("127.0.0.1", port)) as silent:
                silent.settimeout(REFUSED_TIMEOUT_S + 5)
                started = time.monotonic()
                assert silent.recv(4096) == b""  # closed by the agent, unasked
                assert time.monotonic() - started < REFUSED_TIMEOUT_S + 2
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
