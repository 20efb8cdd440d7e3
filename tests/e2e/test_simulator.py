"""``edge-agent simulate``: 50 simulated devices against a real fleet and a real broker.

Real components throughout: ``edge-fleet serve`` (over SQLite, the quickstart's set-up;
the simulator drives PostgreSQL fleets in the rollout, drift and two-worker tests), a
private mosquitto running the production configuration (each simulated device connects
with its own account, given in ``--brokers-file``), and the simulator as one
``edge-agent simulate`` process whose devices run the agent's code: signed desired states,
TUF download, slots, the onnxruntime health check and engine.

The only thing not real is what the simulator injects, through its fault file, at the
boundaries it names (``agent/simulate/device.py``): a health-check verdict after the real
check, latency and model errors around the real engine, a crash after the slot switch, and
a network loss (MQTT DISCONNECT with Last Will).
"""

from __future__ import annotations

import pytest

from tests.fixtures.simulator import publish_versions, start_simulator, write_faults
from tests.fixtures.waiting import wait_until

COUNT = 50
IDS = [f"sim-{index:04d}" for index in range(1, COUNT + 1)]
UNHEALTHY = IDS[:5]
SLOW, ERRORS, CRASHER = IDS[5], IDS[6], IDS[7]
OFFLINE = IDS[10:12]


def _devices(fleet) -> dict[str, dict]:
    return {d["id"]: d for d in fleet.get("/api/v1/devices").json()}


def _deploy(fleet, version: int, ids: list[str]) -> None:
    args = [arg for device_id in ids for arg in ("--device", device_id)]
    done = fleet.cli("deploy", "detector", "--version", str(version), *args)
    assert done.returncode == 0, done.stderr


def _active(device: dict) -> int | None:
    model = device.get("active_model")
    return model["version"] if model else None


def _write(path, faults: dict) -> None:
    write_faults(path, {"devices": faults})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_fifty_simulated_devices_register_update_and_show_each_injected_fault(
    tmp_path, fleet_server, mosquitto, make_bundle
):
    publish_versions(fleet_server, make_bundle, ((1, 0), (2, 1)))
    sim, faults = start_simulator(
        tmp_path, fleet_server.url, mosquitto, IDS,
        {"devices": {IDS[0]: {"labels": {"ring": "canary"}}}}, "--interval", "1",
        "--keepalive", "5", "--inferences", "5", "--restart-delay", "0.5")
    try:
        # All register, online, heartbeating, with their labels.
        def all_registered():
            listed = _devices(fleet_server)
            ready = all(listed.get(i, {}).get("online") and listed[i]["heartbeat"] for i in IDS)
            return listed if ready else None

        listed = wait_until(all_registered, timeout=90, interval=0.5,
                            what="50 simulated devices online with a heartbeat")
        assert listed[IDS[0]]["labels"] == {"site": "lab", "ring": "canary"}
        assert all(listed[i]["labels"] == {"site": "lab"} for i in IDS[1:])

        # A deployment reaches every one of them, and the load runs on the new model.
        _deploy(fleet_server, 1, IDS)

        def all_on(version: int, ids: list[str]):
            listed = _devices(fleet_server)
            return listed if all(_active(listed[i]) == version for i in ids) else None

        wait_until(lambda: all_on(1, IDS), timeout=120, interval=0.5, what="v1 on all 50")
        wait_until(lambda: all(d["heartbeat"]["inference_count"] > 0
                               for d in _devices(fleet_server).values()),
                   timeout=30, what="inferences counted in heartbeats")

        # Faults, then v2: five fail their health check and keep v1; one crashes right
        # after switching and comes back with v2; one is slow; one raises model errors.
        _write(faults, {
            **{i: {"fail_health_check": True} for i in UNHEALTHY},
            SLOW: {"latency_ms": 60}, ERRORS: {"error_rate": 1.0},
            CRASHER: {"crash_after_install": True},
        })
        # The file is re-read within a second; the slow device's next beats show it.
        wait_until(lambda: (_devices(fleet_server)[SLOW]["heartbeat"]["latency_ms_p50"] or 0)
                   >= 55, timeout=30, what="injected latency in the slow device's heartbeats")
        _deploy(fleet_server, 2, IDS)
        healthy = [i for i in IDS if i not in UNHEALTHY]
        listed = wait_until(lambda: all_on(2, healthy), timeout=120, interval=0.5,
                            what="v2 on the 45 healthy devices")
        for device_id in UNHEALTHY:
            failed = wait_until(
                lambda d=device_id: [e["detail"] for e in fleet_server.events(d)
                                     if e["event"] == "failed"],
                timeout=30, what=f"{device_id} reports its failed install")
            assert failed[-1]["reason"] == "health_check_failed"
            assert failed[-1]["bundle"] == {"name": "detector", "version": 2}
            assert _active(fleet_server.device(device_id)) == 1  # the old model serves on
        normal = _devices(fleet_server)[IDS[20]]["heartbeat"]
        assert normal["latency_ms_p50"] < 30, normal
        wait_until(lambda: _devices(fleet_server)[ERRORS]["heartbeat"]["error_count"] > 0,
                   timeout=30, what="injected model errors counted")
        assert normal["error_count"] == 0

        # The crashed device restarted on its own state: v2 serving, the desired state it
        # had accepted, a second `started`, and what it sent before the crash not lost.
        crashed = wait_until(lambda: (d := fleet_server.device(CRASHER))["online"] and d,
                             timeout=30, what="the crashed device back online")
        assert crashed["online"] and crashed["desired_generation"] == 2
        events = wait_until(
            lambda: (got := fleet_server.events(CRASHER)) and got[-1]["event"] == "healthy"
            and got, timeout=30, what="the crashed device's confirmation")
        steps = [e["event"] for e in events]
        assert steps.count("started") == 2, steps
        # In seq order: what it sent before the crash reached the fleet (the outbox is on
        # disk), then the restarted daemon, counting on from its stored seq, announced
        # itself serving v2 (checked again at start) and confirmed the generation.
        assert steps[-5:] == ["downloading", "verified", "installed", "started", "healthy"], \
            steps
        assert events[-2]["detail"]["model"] == {"name": "detector", "version": 2}
        assert events[-1]["detail"]["already_active"] is True

        # Offline: the fleet sees them go (Last Will) and come back.
        _write(faults, {i: {"offline": True} for i in OFFLINE})
        wait_until(lambda: not any(_devices(fleet_server)[i]["online"] for i in OFFLINE),
                   timeout=30, what="offline devices shown offline")
        assert _devices(fleet_server)[IDS[20]]["online"]
        _write(faults, {})
        back = wait_until(lambda: all_registered(), timeout=60, what="offline devices back")
        before = {i: back[i]["heartbeat"]["sent_at"] for i in OFFLINE}
        wait_until(lambda: all(_devices(fleet_server)[i]["heartbeat"]["sent_at"] > before[i]
                               for i in OFFLINE), timeout=30, what="heartbeats after return")
    finally:
        code = sim.terminate(timeout=60)
    assert code == 0, sim.log()[-3000:]
    assert "Traceback" not in sim.log()
    listed = _devices(fleet_server)
    assert not any(listed[i]["online"] for i in IDS), "a clean stop says offline"
