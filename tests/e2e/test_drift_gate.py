"""The rollout's output-drift gate, end to end: a new version whose outputs depart from the
previous version's on the canary devices is halted there and rolled back.

Real components: ``edge-fleet serve`` (SQLite), a private mosquitto with one account per
device, ``edge-agent simulate`` (the agent's engine, drift window and outbox). The one
boundary is what devices are fed: rows of an N(0,1) ``.npy`` file (the fault file's
``inputs``), the same for both versions, so only the models differ.

Version 1 and version 2 are the same network architecture trained (here: initialised)
differently, so on the same inputs version 2 answers differently: its own baseline, built
by version 2 on the training rows, matches what it answers on the devices, and only the
comparison with version 1 on the same devices shows the change.
"""

from __future__ import annotations

import numpy as np

from fleet.bundle_build import build_bundle
from tests.fixtures.broker import FLEET_ACCOUNT, PUBLISHER_ACCOUNT
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.processes import start_fleet
from tests.fixtures.rollouts import (
    active_version,
    create_rollout,
    devices_by_id,
    rollout_audit,
    rollout_ended,
)
from tests.fixtures.simulator import start_simulator
from tests.fixtures.waiting import wait_until

IDS = [f"sim-{index:04d}" for index in range(1, 7)]
ROWS = 20_000


def _judged_windows(fleet, device_id: str, version: int) -> int:
    history = fleet.get(f"/api/v1/devices/{device_id}/drift").json()
    return sum(1 for w in history["windows"] if w["version"] == version and w["rows"]
               and w["score"] is not None)


def test_a_version_whose_outputs_depart_from_the_previous_one_is_halted_on_the_canary(
    tmp_path, mosquitto
):
    fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT),
                        f"sqlite:///{tmp_path / 'fleet.db'}",
                        publisher_broker_url=mosquitto.url_for(PUBLISHER_ACCOUNT))
    sim = None
    try:
        train = tmp_path / "train.npy"
        np.save(train, np.random.default_rng(1).normal(size=(ROWS, 4)).astype(np.float32))
        for version, seed in ((1, 3), (2, 11)):
            model = tmp_path / f"model-{version}.onnx"
            build_mlp_onnx(model, seed=seed)
            built = build_bundle(model, name="detector", version=version,
                                 out_dir=tmp_path / "bundles", baseline=train)
            published = fleet.cli("bundle", "publish", str(built.path))
            assert published.returncode == 0, published.stderr
        inputs = tmp_path / "inputs.npy"
        np.save(inputs, np.random.default_rng(7).normal(size=(ROWS, 4)).astype(np.float32))
        sim, _ = start_simulator(tmp_path, fleet.url, mosquitto, IDS,
                                 {"defaults": {"inputs": str(inputs), "batch": 20}},
                                 "--interval", "1", "--inferences", "20",
                                 "--drift-window", "10", "--keepalive", "10")
        wait_until(lambda: len(devices_by_id(fleet)) == len(IDS), timeout=90,
                   what="the simulated devices registered")
        deployed = fleet.cli("deploy", "detector", "--version", "1",
                             *[a for d in IDS for a in ("--device", d)])
        assert deployed.returncode == 0, deployed.stderr
        # Version 1's outputs on every device: the reference the gate compares with.
        wait_until(lambda: all(_judged_windows(fleet, d, 1) >= 1 for d in IDS), timeout=120,
                   interval=1, what="a judged window of version 1 from every device")

        rollout = create_rollout(fleet, 2, "--waves", "2,100%", "--bake", "120",
                                 "--max-output-drift", "0.2")
        done = rollout_ended(fleet, rollout["id"], timeout=150)
        assert done["status"] == "halted" and "output_drift" in done["reason"], done
        halt = next(e for e in rollout_audit(fleet, rollout["id"])
                    if e["action"] == "rollout.halt")
        gate = next(g for g in halt["details"]["gates"] if g["gate"] == "output_drift")
        print(f"v2 halted by output_drift: {gate['value']:.3f} against {gate['threshold']} "
              f"over {gate['devices']} devices ({gate['detail']})")
        assert gate["verdict"] == "fail" and gate["value"] > 0.2
        # Only the canary wave received version 2, and it is rolled back to version 1.
        canary = [d["device_id"] for d in fleet.get(
            f"/api/v1/rollouts/{rollout['id']}/devices").json() if d["wave"] == 1]
        assert len(canary) == 2, canary
        wait_until(lambda: all(active_version(devices_by_id(fleet)[d]) == 1 for d in IDS),
                   timeout=120, what="every device back on (or still on) version 1")
        others = set(IDS) - set(canary)
        assert not any(e["event"] == "desired_received" and (e.get("detail") or {}).get(
            "bundle", {}).get("version") == 2 for d in others for e in fleet.events(d))
    finally:
        if sim is not None:
            sim.terminate()
        fleet.terminate()
