"""Real-model shapes end to end: built with hints, published, deployed, served by a real agent.

A Silero-VAD-like model (inputs ``input``, ``state`` and the int64 scalar ``sr``; outputs
``output`` and ``stateN``) and an OCR-detector-like model (dynamic height and width,
multiples of 32 only) go through ``edge-fleet bundle build`` with ``--input-shape`` /
``--input-value``, ``bundle publish`` and ``deploy`` to an enrolled ``edge-agent run``:
the device's health check runs the hinted samples, ``.npz`` answers come back for several
outputs, and a schema-valid input the runtime refuses is a 422 counted as the caller's
error in the heartbeats, not the model's.
"""

from __future__ import annotations

import io

import httpx
import numpy as np

from tests.fixtures.models import (
    build_detector_onnx,
    build_vad_onnx,
    detector_reference,
    vad_reference,
)
from tests.fixtures.waiting import wait_until

NPZ = "application/x-npz"


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _active(fleet_server, device_id: str) -> dict | None:
    device = fleet_server.device(device_id)
    return device["active_model"] if device else None


def _serving(endpoint: str, name: str) -> bool:
    try:
        described = httpx.get(f"{endpoint}/v1/model", timeout=2)
    except httpx.HTTPError:  # not listening yet
        return False
    return described.status_code == 200 and described.json()["name"] == name


def _build_and_publish(fleet_server, tmp_path, model, name: str, *hints: str) -> None:
    built = fleet_server.cli("bundle", "build", str(model), "--name", name, "--version", "1",
                             *hints, "--out", str(tmp_path / "bundles"))
    assert built.returncode == 0, built.stderr
    assert "warning" not in built.stderr, built.stderr  # the hints left nothing to guess
    bundle = tmp_path / "bundles" / f"{name}-1.bundle"
    published = fleet_server.cli("bundle", "publish", str(bundle))
    assert published.returncode == 0, published.stderr


def _client_errors(fleet_server, device_id: str) -> int:
    beats = fleet_server.get(f"/api/v1/devices/{device_id}/telemetry").json()
    return beats[-1]["client_error_count"] if beats else -1


def test_multi_input_and_dynamic_size_models_build_deploy_and_serve(
    fleet_server, mosquitto, agents, tmp_path
):
    build_vad_onnx(tmp_path / "vad.onnx", metadata={"sampling_rates": "8000,16000"})
    build_detector_onnx(tmp_path / "det.onnx")
    _build_and_publish(fleet_server, tmp_path, tmp_path / "vad.onnx", "vad",
                       "--input-shape", "input=1,512", "--input-value", "sr=16000")
    _build_and_publish(fleet_server, tmp_path, tmp_path / "det.onnx", "ocr-det",
                       "--input-shape", "x=1,3,64,96")

    agents.enroll("mic-1", fleet_server.url)
    agent = agents.start("mic-1", mosquitto)
    wait_until(lambda: fleet_server.device("mic-1"), timeout=15, what="mic-1 registered")

    # --- the VAD: three inputs (one an int64 scalar), two outputs -------------------------
    deployed = fleet_server.cli("deploy", "vad", "--version", "1", "--device", "mic-1")
    assert deployed.returncode == 0, deployed.stderr
    wait_until(lambda: _active(fleet_server, "mic-1") == {"name": "vad", "version": 1},
               timeout=30, what="vad v1 active")
    wait_until(lambda: _serving(agent.endpoint, "vad"), timeout=10, what="vad served")
    assert "healthy" in [e["event"] for e in fleet_server.events("mic-1")]

    rng = np.random.default_rng(7)
    audio = rng.normal(size=(1, 512)).astype(np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    with httpx.Client(base_url=agent.endpoint, timeout=10) as client:
        described = client.get("/v1/model").json()
        assert described["metadata"] == {"sampling_rates": "8000,16000"}
        for _ in range(3):  # recurrent: each answer's state is the next request's
            answer = client.post("/v1/infer", content=_npz(input=audio, state=state,
                                                          sr=np.array(16000)),
                                 headers={"Content-Type": NPZ, "Accept": "application/x-npy"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == NPZ
            with np.load(io.BytesIO(answer.content), allow_pickle=False) as outputs:
                want_output, want_state = vad_reference(audio, state, 16000)
                np.testing.assert_allclose(outputs["output"], want_output, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(outputs["stateN"], want_state, rtol=1e-5, atol=1e-6)
                state = outputs["stateN"]

        refused = client.post("/v1/infer", content=_npz(input=audio, state=state,
                                                         sr=np.array(44100)),
                              headers={"Content-Type": NPZ})
        assert refused.status_code == 422, refused.text
        assert "the model refused this input" in refused.json()["error"]

    # --- the detector: dynamic height and width, multiples of 32 only ----------------------
    deployed = fleet_server.cli("deploy", "ocr-det", "--version", "1", "--device", "mic-1")
    assert deployed.returncode == 0, deployed.stderr
    wait_until(lambda: _active(fleet_server, "mic-1") == {"name": "ocr-det", "version": 1},
               timeout=30, what="ocr-det v1 active")
    wait_until(lambda: _serving(agent.endpoint, "ocr-det"), timeout=10, what="ocr-det served")
    with httpx.Client(base_url=agent.endpoint, timeout=10) as client:
        image = rng.random((1, 3, 128, 160), np.float32)
        answer = client.post("/v1/infer", content=_npz(x=image),
                             headers={"Content-Type": NPZ, "Accept": NPZ})
        assert answer.status_code == 200, answer.text
        with np.load(io.BytesIO(answer.content), allow_pickle=False) as outputs:
            np.testing.assert_allclose(outputs["maps"], detector_reference(image), rtol=1e-5)
        refused = client.post("/v1/infer", content=_npz(x=np.zeros((1, 3, 100, 160), np.float32)),
                              headers={"Content-Type": NPZ})
        assert refused.status_code == 422, refused.text
        assert "Reshape" in refused.json()["error"]

    # Both refusals reach the fleet as the caller's errors; the model failed nothing.
    wait_until(lambda: _client_errors(fleet_server, "mic-1") >= 2, timeout=15,
               what="the client errors in a heartbeat")
    last = fleet_server.get("/api/v1/devices/mic-1/telemetry").json()[-1]
    assert last["error_count"] == 0
    assert "Traceback" not in agent.log()
