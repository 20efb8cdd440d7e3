"""Drift end to end: 40 simulated devices, 8 of them fed shifted inputs, one fleet.

Real components throughout: ``edge-fleet serve`` on PostgreSQL, a private mosquitto with
one account per device, ``edge-agent simulate`` whose devices run the agent's code (the
onnxruntime engine, the drift window, the outbox), and a webhook receiver that is a real
HTTP server in this test. The one boundary the simulator adds is what each device is fed:
rows drawn at random from an ``.npy`` file the fault file names (``inputs``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from agent.contract import MAX_BASELINE_BYTES, Baseline, decode
from fleet.bundle_build import build_bundle, member_bytes
from fleet.drift.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from tests.fixtures.broker import FLEET_ACCOUNT, PUBLISHER_ACCOUNT
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.processes import start_fleet
from tests.fixtures.simulator import start_simulator
from tests.fixtures.waiting import wait_until

COUNT = 40
IDS = [f"sim-{index:04d}" for index in range(1, COUNT + 1)]
SHIFTED = IDS[3:35:4]  # 8 devices spread over the fleet
SECRET = "drift-test-secret"
FEATURES = 4
ROWS = 20_000


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]
    arrived: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append((dict(self.headers), body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def webhook_receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _inputs(tmp_path):
    """N(0,1) rows for most devices; for each shifted device one feature moved by one
    standard deviation (the first four) or scaled by 2.5 (the next four)."""
    rng = np.random.default_rng(7)
    normal = tmp_path / "inputs-normal.npy"
    np.save(normal, rng.normal(size=(ROWS, FEATURES)).astype(np.float32))
    shifted: dict[str, tuple[str, int]] = {}
    for index, device_id in enumerate(SHIFTED):
        rows = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
        feature = index % FEATURES
        if index < FEATURES:
            rows[:, feature] += 1.0
        else:
            rows[:, feature] *= 2.5
        path = tmp_path / f"inputs-{device_id}.npy"
        np.save(path, rows)
        shifted[device_id] = (str(path), feature)
    return str(normal), shifted


def test_the_eight_shifted_devices_of_forty_are_flagged_on_their_features_and_signalled_once(
    tmp_path, mosquitto, postgres_url, webhook_receiver
):
    port = webhook_receiver.server_address[1]
    fleet = start_fleet(
        tmp_path, mosquitto.url_for(FLEET_ACCOUNT), postgres_url,
        publisher_broker_url=mosquitto.url_for(PUBLISHER_ACCOUNT),
        extra_env={"EDGEFLEET_DRIFT_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
                   "EDGEFLEET_DRIFT_WEBHOOK_SECRET": SECRET})
    sim = None
    try:
        work = tmp_path / "build"
        work.mkdir()
        build_mlp_onnx(work / "model.onnx", seed=3)
        train = work / "train.npy"
        np.save(train, np.random.default_rng(1).normal(size=(ROWS, FEATURES)).astype(np.float32))
        built = build_bundle(work / "model.onnx", name="detector", version=1,
                             out_dir=tmp_path / "bundles", baseline=train)
        baseline = decode(Baseline, member_bytes(built.path, "baseline.json", MAX_BASELINE_BYTES))
        inputs = [h.feature for h in baseline.features if not h.feature.startswith("output:")]
        assert len(inputs) == FEATURES, inputs
        published = fleet.cli("bundle", "publish", str(built.path))
        assert published.returncode == 0, published.stderr

        normal, shifted = _inputs(tmp_path)
        # 400 rows a second offered, 250 binned (the agent's sampling): 4,000 a window. At
        # 12 s (3,000 offered) a loaded CI machine served near the 2,000-row floor and one
        # of 40 unshifted devices crossed by sampling noise alone (score 1.01, once).
        faults = {"defaults": {"inputs": normal, "batch": 20},
                  "devices": {d: {"inputs": path} for d, (path, _) in shifted.items()}}
        sim, _ = start_simulator(tmp_path, fleet.url, mosquitto, IDS, faults,
                                 "--interval", "1", "--inferences", "20",
                                 "--drift-window", "16", "--keepalive", "10")
        wait_until(lambda: sum(bool(d["online"]) for d in fleet.get("/api/v1/devices").json())
                   == COUNT, timeout=120, interval=0.5, what="40 simulated devices online")
        deployed = fleet.cli("deploy", "detector", "--version", "1",
                             *[a for d in IDS for a in ("--device", d)])
        assert deployed.returncode == 0, deployed.stderr

        # Every device judged over at least three windows: time for a false alarm to show.
        def judged_everywhere(at_least: dict[str, int]):
            counts = {}
            for device_id in IDS:
                history = fleet.get(f"/api/v1/devices/{device_id}/drift").json()
                counts[device_id] = sum(w["score"] is not None for w in history["windows"])
            return counts if all(counts[d] >= at_least[d] for d in IDS) else None

        counts = wait_until(lambda: judged_everywhere(dict.fromkeys(IDS, 3)), timeout=240,
                            interval=2, what="three judged drift windows from each device")
        print(f"judged windows per device: min {min(counts.values())}, "
              f"max {max(counts.values())}")

        flagged = {item["device_id"]: item
                   for item in fleet.get("/api/v1/drift").json()["devices"]}
        assert sorted(flagged) == sorted(shifted), (
            f"flagged {sorted(flagged)}, shifted {sorted(shifted)}")
        for device_id, (_, feature) in shifted.items():
            crossing = flagged[device_id]["alert"]["features"]
            crossing_inputs = [f for f in crossing if not f.startswith("output:")]
            assert crossing_inputs == [inputs[feature]], (device_id, crossing)
            print(f"{device_id}: score {flagged[device_id]['score']}, features {crossing}")

        # One signed notice per shifted device, none for the others; no second one while
        # the alerts stay open.
        def notices():
            got = list(webhook_receiver.received)
            return got if len(got) >= len(shifted) else None

        wait_until(notices, timeout=60, what="a webhook notice per drifting device")
        # Two more windows from every device: still one notice each, and no new alert.
        counts = judged_everywhere(dict.fromkeys(IDS, 0))
        wait_until(lambda: judged_everywhere({d: counts[d] + 2 for d in IDS}), timeout=120,
                   interval=2, what="two more judged windows from each device")
        assert len(webhook_receiver.received) == len(shifted)
        assert sorted(i["device_id"] for i in fleet.get("/api/v1/drift").json()["devices"]) \
            == sorted(shifted)
        devices_noticed = []
        for headers, body in webhook_receiver.received:
            assert verify(SECRET.encode(), headers.get(SIGNATURE_HEADER), body,
                          now=time.time()), headers
            assert headers.get(DELIVERY_HEADER)
            notice = json.loads(body)
            assert notice["type"] == "drift.raised"
            devices_noticed.append(notice["alert"]["device_id"])
        assert sorted(devices_noticed) == sorted(shifted)

        audit = fleet.get("/api/v1/audit?action=drift.raised").json()
        print(f"audit entries drift.raised: {len(audit)}")
    finally:
        if sim is not None:
            sim.terminate()
        fleet.terminate()
