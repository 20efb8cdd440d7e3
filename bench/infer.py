"""Benchmark: the cost of the agent's inference path over the bare runtime, in one run.

For batch 1 and 256, p50/p99 latency and throughput of
  (a) the bare runtime (``onnxruntime.InferenceSession.run``; TFLite ``Interpreter.invoke``),
  (b) the agent's engine in-process (``Engine.infer``: validation + the same runtime), as
      the bundle configures it (NaN refused: every request is scanned) and with NaN allowed
      (``engine_nan_allowed_vs_bare``: the engine's fixed cost alone),
  (c) the agent's local HTTP endpoint (keep-alive; JSON for batch 1, .npy for batch 256),
      called from another process as applications do, over TCP and over its Unix socket
      option, and beside it the transport's floor: the same server and client (TCP) with a
      handler that only reads the body and answers fixed bytes of the same size,
and the ratios (b)/(a) and (c)/(a) of p50 latency. Then the idle RSS of a real
``edge-agent run`` process with one model loaded, and beside it the floor: a Python process
holding only an onnxruntime session on the same model. Last line: one JSON object.

    python bench/infer.py                  # default sizes
    python bench/infer.py --seconds 0.3    # a quick run
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
        out = subprocess.run(
            [sys.executable, __file__, "--http-client", json.dumps(spec)],
            capture_output=True, text=True, check=True, timeout=60 + 10 * seconds * len(urls),
        ).stdout
    return json.loads(out.splitlines()[-1])


def run_http_client(spec: dict) -> None:
    """The other process of :func:`http_latencies`: prints the results as one JSON line."""
    import httpx

    body = Path(spec["body"]).read_bytes()

    def client_for(url: str) -> httpx.Client:
        if url.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=url.removeprefix("unix:"))
            return httpx.Client(transport=transport, base_url="http://agent", timeout=30)
        return httpx.Client(base_url=url, timeout=30)

    clients = {name: client_for(url) for name, url in spec["urls"].items()}

    def post(client: httpx.Client) -> None:
        client.post("/v1/infer", content=body, headers=spec["headers"]).raise_for_status()

    calls = {name: (lambda client=client: post(client)) for name, client in clients.items()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
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
                     "http_floor": floor.url}, body, headers, args.seconds,
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
                if tflite is not None:
                    figures[f"tflite_engine_vs_bare_b{batch}"] = round(
                        results["tfl_eng"]["p50_ms"] / results["tfl_bare"]["p50_ms"], 3)
        finally:
            client.close()
            floor.close()
            endpoint.stop()
            unix_endpoint.stop()
            host.close()
            engine_nan_ok.close()
        figures["idle_rss_mb"] = round(rss_of_idle_agent(work / "state"), 1)
        figures["bare_session_rss_mb"] = round(rss_of_bare_session(slot / manifest.model_file), 1)
        print(f"idle agent with one model loaded: {figures['idle_rss_mb']} MB RSS "
              f"(python + onnxruntime session alone: {figures['bare_session_rss_mb']} MB)")
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
