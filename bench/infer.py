"""Benchmark: the cost of the agent's inference path over the bare runtime, in one run.

For batch 1 and 256, p50/p99 latency and throughput of
  (a) the bare runtime (``onnxruntime.InferenceSession.run``; TFLite ``Interpreter.invoke``),
  (b) the agent's engine in-process (``Engine.infer``: validation + the same runtime), as
      the bundle configures it (NaN refused: every request is scanned) and with NaN allowed
      (``engine_nan_allowed_vs_bare``: the engine's fixed cost alone),
  (c) the agent's local HTTP endpoint (keep-alive; JSON for batch 1, .npy for batch 256),
      called from another process as applications do, over TCP and over its Unix socket
      option, and beside it the transport's floor: a stdlib ``http.server`` (a thread per
      connection) whose handler only reads the body and answers fixed bytes of the same
      size,
  (d) two other servers of the same engine, called by the same client: the asyncio floor, a
      minimal asyncio server that finds Content-Length by hand, checks nothing and runs the
      same decoding, ``Engine.infer`` and encoding (``endpoint_vs_asyncio_floor``: what
      the endpoint's HTTP parsing, limits and routing cost), and a FastAPI app on uvicorn
      doing the same in an ``async def`` route (``endpoint_vs_fastapi``),
and the ratios (b)/(a) and (c)/(a) of p50 latency. Client and servers run on the same CPUs
(``--cpus``, one by default, as on a small device), so no server gets a core to itself.
Then a model with several inputs and outputs (Silero-VAD-like: 512 audio samples, a
2x1x128 state and an int64 ``sr``; two outputs) through the endpoint: a JSON request and
answer, an ``.npz`` request (``np.savez``, 3.3 KB) with a JSON answer, and ``.npz`` both
ways (``vad_npz_vs_json``: the binary path should be the fast one), and in-process the
endpoint's ``.npz`` reader against ``np.load`` on the same body (``npz_read_vs_np_load``).
Then the idle RSS of a real ``edge-agent run`` process with one model loaded, and beside it
the floor: a Python process holding only an onnxruntime session on the same model. Last
line: one JSON object.

    python bench/infer.py                  # default sizes
    python bench/infer.py --seconds 0.3    # a quick run
    python bench/infer.py --cpus 0,1       # client and servers on these CPUs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES, HIDDEN, OUTPUTS = 64, 256, 16  # a small but not trivial tabular/sensor model


def measure(
    calls: dict[str, object], seconds: float, block: int = 25
) -> dict[str, dict[str, float]]:
    """Rotate through the calls in blocks of ``block`` back-to-back calls each (after a
    warm-up) for about ``seconds`` per call, so that machine noise and clock drift hit every
    variant alike; latency percentiles in ms.

    Blocks, not one call each: a call that follows a different kind of call pays for what
    that one left behind (the endpoint's server thread still finishing its response, caches
    filled with another runtime's buffers), and with one call per turn that cost lands on
    whichever variant comes next in the rotation."""
    for call in calls.values():
        for _ in range(20):
            call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + seconds * len(calls)
    while time.perf_counter() < deadline or min(map(len, timings.values())) < 2 * block:
        for name, call in calls.items():
            record = timings[name].append
            for _ in range(block):
                started = time.perf_counter()
                call()
                record(time.perf_counter() - started)
    results = {}
    for name, values in timings.items():
        array = np.array(values) * 1000
        results[name] = {
            "p50_ms": float(np.percentile(array, 50)),
            "p99_ms": float(np.percentile(array, 99)),
            "calls_per_s": len(values) / float(array.sum() / 1000),
        }
    return results


def build_bundle(work: Path) -> Path:
    from fleet.bundle_build import build_bundle as build
    from tests.fixtures.models import build_mlp_onnx

    model = work / "mlp.onnx"
    build_mlp_onnx(model, features=FEATURES, hidden=HIDDEN, outputs=OUTPUTS, seed=0)
    return build(model, name="bench", version=1, out_dir=work).path


def build_vad_bundle(work: Path) -> Path:
    from fleet.bundle_build import build_bundle as build
    from tests.fixtures.models import build_vad_onnx

    model = work / "vad.onnx"
    build_vad_onnx(model)
    return build(model, name="vad", version=1, out_dir=work,
                 input_shapes={"input": (1, 512)}, input_values={"sr": 16000}).path


def multi_input_figures(work: Path, seconds: float) -> dict[str, float]:
    """A three-input, two-output model through the endpoint: JSON vs ``.npz`` bodies."""
    from agent.bundle import extract_bundle
    from agent.endpoint import InferenceEndpoint
    from agent.health import open_checked_engine
    from agent.installer import LoadedModel
    from agent.npy import load_npz
    from agent.serving import ModelHost

    slot = work / "vad-slot"
    manifest = extract_bundle(build_vad_bundle(work), slot, 1 << 30)
    host = ModelHost()
    host.swap(LoadedModel("a", manifest, open_checked_engine(slot, manifest,
                                                             intra_op_threads=1)))
    endpoint = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
    rng = np.random.default_rng(1)
    feeds = {"input": rng.normal(size=(1, 512)).astype(np.float32),
             "state": rng.normal(size=(2, 1, 128)).astype(np.float32),
             "sr": np.array(16000, np.int64)}
    buffer = io.BytesIO()
    np.savez(buffer, **feeds)
    npz_body = buffer.getvalue()
    json_body = json.dumps({"inputs": {"input": feeds["input"].tolist(),
                                       "state": feeds["state"].tolist(), "sr": 16000}}).encode()
    variants = {
        "json": (json_body, {"Content-Type": "application/json"}),
        "npz_in": (npz_body, {"Content-Type": "application/x-npz"}),
        "npz": (npz_body, {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}),
    }
    try:  # one client process rotating through the three, so noise hits them alike
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-vad-") as bodies:
            requests = {}
            for name, (body, headers) in variants.items():
                (Path(bodies) / name).write_bytes(body)
                requests[name] = (str(Path(bodies) / name), headers)
            spec = {"urls": dict.fromkeys(variants, endpoint.where), "body": requests["json"][0],
                    "headers": {}, "requests": requests, "seconds": seconds}
            done = subprocess.run(
                [sys.executable, __file__, "--http-client", json.dumps(spec)],
                capture_output=True, text=True, timeout=60 + 10 * seconds * len(variants),
            )
        if done.returncode:
            raise RuntimeError(f"the HTTP client failed:\n{done.stderr}")
        results: dict[str, dict[str, float]] = json.loads(done.stdout.splitlines()[-1])
    finally:
        endpoint.stop()
        host.close()
    reads = measure({
        "load_npz": lambda: load_npz(npz_body, 1 << 24),
        "np_load": lambda: dict(np.load(io.BytesIO(npz_body), allow_pickle=False)),
    }, seconds)
    for name, result in {**results, **reads}.items():
        print(f"vad {name:9s} p50 {result['p50_ms']:8.3f} ms  p99 {result['p99_ms']:8.3f} ms")
    print(f"vad .npz body: {len(npz_body)} bytes, JSON body: {len(json_body)} bytes")
    return {
        "vad_json_p50_ms": round(results["json"]["p50_ms"], 3),
        "vad_npz_in_p50_ms": round(results["npz_in"]["p50_ms"], 3),
        "vad_npz_p50_ms": round(results["npz"]["p50_ms"], 3),
        "vad_npz_vs_json": round(results["npz"]["p50_ms"] / results["json"]["p50_ms"], 3),
        "npz_read_ms": round(reads["load_npz"]["p50_ms"], 4),
        "np_load_npz_ms": round(reads["np_load"]["p50_ms"], 4),
        "npz_read_vs_np_load": round(reads["load_npz"]["p50_ms"] / reads["np_load"]["p50_ms"],
                                     3),
    }


def install(bundle: Path, state_dir: Path):
    """Unpack into slot a and make it current, as the agent's installer would."""
    from agent.bundle import extract_bundle
    from agent.slots import Slots

    slots = Slots(state_dir)
    manifest = extract_bundle(bundle, slots.path("a"), 1 << 30)
    slots.activate("a")
    return slots.path("a"), manifest


def tflite_pair(work: Path):
    """The same MLP as TFLite: a bare interpreter call and the agent's engine, or None."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    from agent.runtime import load_engine
    from tests.fixtures.models import build_mlp_onnx
    from tests.fixtures.tflite_models import build_mlp_tflite

    weights = build_mlp_onnx(work / "twin.onnx", features=FEATURES, hidden=HIDDEN,
                             outputs=OUTPUTS, seed=0)
    path = work / "mlp.tflite"
    build_mlp_tflite(path, weights)
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]
    shape = [None]

    def bare(x: np.ndarray) -> np.ndarray:
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(index_in, x.shape, strict=True)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        return interpreter.get_tensor(index_out)

    return bare, load_engine(path, num_threads=1)


_BARE_SESSION = """
import sys, time
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"x": np.zeros((1, int(sys.argv[2])), np.float32)})
time.sleep(1)
print([int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")][0])
"""


def rss_of_bare_session(model: Path) -> float:
    """The floor under the agent's idle RSS: a Python process holding only an onnxruntime
    session on the same model."""
    out = subprocess.run([sys.executable, "-c", _BARE_SESSION, str(model), str(FEATURES)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


class TransportFloor:
    """The endpoint's transport without the endpoint: the same stdlib server (HTTP/1.1
    keep-alive, TCP_NODELAY, a thread per connection) answering every POST with fixed
    bytes, after reading the body. The same client against it gives what HTTP itself
    costs, so ``endpoint_vs_http_floor`` is what the endpoint adds."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        floor = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", floor.content_type)
                self.send_header("Content-Length", str(len(floor.body)))
                self.end_headers()
                self.wfile.write(floor.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.body, self.content_type = b"{}", "application/json"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def answer_like(self, response) -> None:
        """Answer with the endpoint's own bytes: the same size goes back either way."""
        self.body, self.content_type = response.content, response.headers["Content-Type"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AsyncioFloor:
    """The least an asyncio HTTP server can do for this request: read until the headers
    end, find Content-Length by hand, decode the body as the endpoint does, run the same
    ``ModelHost.infer``, encode as the endpoint does, answer with fixed headers. No limits,
    no checks, no routing: ``endpoint_vs_asyncio_floor`` is what those cost the endpoint."""

    def __init__(self, host) -> None:
        import asyncio
        import threading

        import msgspec

        from agent.npy import dump_npy, load_npy

        encode, decode = msgspec.json.encode, msgspec.json.decode

        def answer(head: bytes, body: bytes) -> bytes:
            if b"application/x-npy" in head:
                outputs, _ = host.infer(load_npy(body))
                payload = dump_npy(next(iter(outputs.values())))
                return (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(payload)) + payload
            outputs, loaded = host.infer(decode(body)["inputs"])
            model = {"name": loaded.manifest.name, "version": loaded.manifest.version}
            payload = encode({"model": model,
                              "outputs": {k: v.tolist() for k, v in outputs.items()}})
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(payload)) + payload

        class Floor(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                self.transport, self.buffer = transport, b""

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                    head = self.buffer[:end].lower()
                    start = head.find(b"content-length:") + 15
                    stop = head.find(b"\r", start)
                    length = int(head[start : stop if stop >= 0 else None])
                    if len(self.buffer) < end + 4 + length:
                        return
                    body = self.buffer[end + 4 : end + 4 + length]
                    self.buffer = self.buffer[end + 4 + length :]
                    self.transport.write(answer(head, body))

        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self.server = await self.loop.create_server(Floor, "127.0.0.1", 0)
            started.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


class FastApiWrapper:
    """What an application developer would write around the same engine: a FastAPI app on
    uvicorn (its defaults: httptools when installed, asyncio), the route an ``async def``
    that decodes, calls ``ModelHost.infer`` inline and encodes as the endpoint does."""

    def __init__(self, host) -> None:
        import threading

        import msgspec
        import uvicorn
        from fastapi import FastAPI, Request, Response

        from agent.npy import dump_npy, load_npy
        from fleet.local_broker import free_port

        app = FastAPI()

        async def infer(request: Request) -> Response:
            body = await request.body()
            if request.headers.get("content-type") == "application/x-npy":
                outputs, _ = host.infer(load_npy(body))
                return Response(dump_npy(next(iter(outputs.values()))),
                                media_type="application/x-npy")
            outputs, model = host.infer(msgspec.json.decode(body)["inputs"])
            return Response(msgspec.json.encode({
                "model": {"name": model.manifest.name, "version": model.manifest.version},
                "outputs": {k: v.tolist() for k, v in outputs.items()},
            }), media_type="application/json")

        # Resolved, not strings (this module has postponed annotations): FastAPI reads them.
        infer.__annotations__ = {"request": Request, "return": Response}
        app.post("/v1/infer")(infer)
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
            lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def http_latencies(
    urls: dict[str, str], body: bytes, headers: dict[str, str], seconds: float
) -> dict[str, dict[str, float]]:
    """POST ``body`` to each URL's ``/v1/infer`` from another process, in rotating blocks.

    Another process, as an application on the device calls the agent: a client thread in
    the server's own process takes turns with it on one GIL, and every handoff lands in the
    measured latency (in one process the endpoint read ~1.6 ms at batch 256; most of the
    difference to a separate client was waiting for the GIL)."""
    with tempfile.NamedTemporaryFile(prefix="edgefleet-bench-body-") as file:
        file.write(body)
        file.flush()
        spec = {"urls": urls, "body": file.name, "headers": headers, "seconds": seconds}
        done = subprocess.run(
            [sys.executable, __file__, "--http-client", json.dumps(spec)],
            capture_output=True, text=True, timeout=60 + 10 * seconds * len(urls),
        )
    if done.returncode:
        raise RuntimeError(f"the HTTP client failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


class RawClient:
    """A keep-alive HTTP/1.1 client on one socket, the request's bytes built once, the
    answer read by its Content-Length: ~10 us of its own per call. httpx (pure-Python h11
    under it) spends ~150 us per call on this machine, more than the servers compared
    here, so with it every ratio between servers reads close to 1."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        import socket

        if url.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(url.removeprefix("unix:"))
        else:
            host, _, port = url.removeprefix("http://").rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lines = ["POST /v1/infer HTTP/1.1", "Host: agent", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.buffer = bytearray()

    def post(self) -> None:
        self.sock.sendall(self.request)
        buffer, recv = self.buffer, self.sock.recv
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            buffer += recv(1 << 20)
        head = bytes(buffer[:end]).lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"not 200: {head[:200]!r}")
        start = head.index(b"content-length:") + 15
        stop = head.find(b"\r", start)
        total = end + 4 + int(head[start : stop if stop >= 0 else None])
        while len(buffer) < total:
            buffer += recv(1 << 20)
        del buffer[:total]


def run_http_client(spec: dict) -> None:
    """The other process of :func:`http_latencies`: prints the results as one JSON line.
    ``spec["requests"]``, when given, holds a body file and headers per URL name."""
    body = Path(spec["body"]).read_bytes()
    requests = {name: (Path(file).read_bytes(), headers)
                for name, (file, headers) in spec.get("requests", {}).items()}
    clients = {name: RawClient(url, *requests.get(name, (body, spec["headers"])))
               for name, url in spec["urls"].items()}
    calls = {name: client.post for name, client in clients.items()}
    print(json.dumps(measure(calls, spec["seconds"])))


def rss_of_idle_agent(state_dir: Path) -> float:
    import httpx

    from fleet.local_broker import free_port

    port = free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "run",
         "--broker", "mqtt://127.0.0.1:9", "--device-id", "bench", "--state-dir",
         str(state_dir), "--listen", f"127.0.0.1:{port}", "--interval", "60"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()["model"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        time.sleep(2)  # settle: idle, model loaded
        with open(f"/proc/{agent.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
    finally:
        agent.terminate()
        agent.wait(10)


def pin_cpus(spec: str) -> set[int]:
    """Pin this process (and so every process it starts) to the CPUs ``spec`` names."""
    allowed = sorted(os.sched_getaffinity(0))
    if "," in spec or not spec.isdigit():
        cpus = {int(cpu) for cpu in spec.split(",")} & set(allowed)
    else:
        cpus = set(allowed[: max(1, int(spec))])
    os.sched_setaffinity(0, cpus or set(allowed))
    return os.sched_getaffinity(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--cpus", default="1",
                        help="CPUs for client and servers alike: a count of the allowed ones "
                             "(default 1) or a list such as 0,1")
    parser.add_argument("--http-client", help=argparse.SUPPRESS)  # see http_latencies
    args = parser.parse_args()
    if args.http_client:
        run_http_client(json.loads(args.http_client))
        return

    import httpx
    import onnxruntime as ort

    from agent.endpoint import InferenceEndpoint
    from agent.health import open_checked_engine
    from agent.installer import LoadedModel
    from agent.runtime import load_engine
    from agent.serving import ModelHost

    cpus = pin_cpus(args.cpus)  # inherited by the client and agent processes
    print(f"client and servers on CPUs {sorted(cpus)}")
    figures: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        slot, manifest = install(build_bundle(work), work / "state")
        # Same thread settings for the bare session and the engine: one intra-op thread, as
        # on a small device, and no two thread pools spinning against each other.
        engine = open_checked_engine(slot, manifest, intra_op_threads=1)
        # The same model with NaN allowed (no scan): separates the NaN policy's cost, which
        # grows with the input, from the engine's fixed cost per call.
        engine_nan_ok = load_engine(slot / manifest.model_file, intra_op_threads=1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(slot / manifest.model_file), options,
                                       providers=["CPUExecutionProvider"])
        tflite = tflite_pair(work)
        host = ModelHost()
        host.swap(LoadedModel("a", manifest, engine))
        endpoint = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
        unix_endpoint = InferenceEndpoint(host, socket_path=work / "agent.sock").start()
        client = httpx.Client(base_url=endpoint.where, timeout=30)
        floor = TransportFloor()
        asyncio_floor = AsyncioFloor(host)
        fastapi = FastApiWrapper(host)
        try:
            for batch in (1, 256):
                x = rng.normal(size=(batch, FEATURES)).astype(np.float32)
                npy = io.BytesIO()
                np.save(npy, x)
                npy_body = npy.getvalue()
                json_body = json.dumps({"inputs": x.tolist()}).encode()

                body = npy_body if batch > 1 else json_body
                headers = ({"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
                           if batch > 1 else {"Content-Type": "application/json"})
                response = client.post("/v1/infer", content=body, headers=headers)
                floor.answer_like(response.raise_for_status())

                calls = {
                    "bare": lambda x=x: session.run(None, {"x": x}),
                    "engine": lambda x=x: engine.infer(x),
                    "eng_nan+": lambda x=x: engine_nan_ok.infer(x),
                }
                if tflite is not None:
                    bare_tflite, tflite_engine = tflite
                    calls["tfl_bare"] = lambda x=x, call=bare_tflite: call(x)
                    calls["tfl_eng"] = lambda x=x, engine=tflite_engine: engine.infer(x)
                results = measure(calls, args.seconds)
                results.update(http_latencies(
                    {"endpoint": endpoint.where, "unix_sock": unix_endpoint.where,
                     "http_floor": floor.url, "aio_floor": asyncio_floor.url,
                     "fastapi": fastapi.url}, body, headers, args.seconds,
                ))
                for name, result in results.items():
                    print(f"batch {batch:3d} {name:8s} p50 {result['p50_ms']:8.3f} ms  "
                          f"p99 {result['p99_ms']:8.3f} ms  "
                          f"{result['calls_per_s'] * batch:12.0f} rows/s")
                bare = results["bare"]["p50_ms"]
                figures[f"engine_vs_bare_b{batch}"] = round(results["engine"]["p50_ms"] / bare, 3)
                figures[f"engine_nan_allowed_vs_bare_b{batch}"] = round(
                    results["eng_nan+"]["p50_ms"] / bare, 3)
                figures[f"endpoint_vs_bare_b{batch}"] = round(
                    results["endpoint"]["p50_ms"] / bare, 3)
                figures[f"endpoint_p50_ms_b{batch}"] = round(results["endpoint"]["p50_ms"], 3)
                figures[f"endpoint_unix_vs_bare_b{batch}"] = round(
                    results["unix_sock"]["p50_ms"] / bare, 3)
                figures[f"endpoint_unix_p50_ms_b{batch}"] = round(
                    results["unix_sock"]["p50_ms"], 3)
                figures[f"http_floor_p50_ms_b{batch}"] = round(results["http_floor"]["p50_ms"], 3)
                figures[f"endpoint_vs_http_floor_b{batch}"] = round(
                    results["endpoint"]["p50_ms"] / results["http_floor"]["p50_ms"], 3)
                figures[f"bare_p50_ms_b{batch}"] = round(bare, 4)
                for other in ("aio_floor", "fastapi"):
                    label = {"aio_floor": "asyncio_floor"}.get(other, other)
                    figures[f"{label}_p50_ms_b{batch}"] = round(results[other]["p50_ms"], 3)
                    figures[f"endpoint_vs_{label}_b{batch}"] = round(
                        results["endpoint"]["p50_ms"] / results[other]["p50_ms"], 3)
                if tflite is not None:
                    figures[f"tflite_engine_vs_bare_b{batch}"] = round(
                        results["tfl_eng"]["p50_ms"] / results["tfl_bare"]["p50_ms"], 3)
        finally:
            client.close()
            floor.close()
            asyncio_floor.close()
            fastapi.close()
            endpoint.stop()
            unix_endpoint.stop()
            host.close()
            engine_nan_ok.close()
        figures.update(multi_input_figures(work, args.seconds))
        figures["idle_rss_mb"] = round(rss_of_idle_agent(work / "state"), 1)
        figures["bare_session_rss_mb"] = round(rss_of_bare_session(slot / manifest.model_file), 1)
        print(f"idle agent with one model loaded: {figures['idle_rss_mb']} MB RSS "
              f"(python + onnxruntime session alone: {figures['bare_session_rss_mb']} MB)")
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
