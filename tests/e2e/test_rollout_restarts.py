"""A rollout survives its controller killed and its broker restarted mid-wave, and a device
offline during its wave is re-driven, then reported stuck, without holding the rollout.

A real ``edge-fleet serve`` on PostgreSQL (killed with SIGKILL, restarted on the same port
and data directory), the production broker configuration (stopped and started again),
and ``edge-agent simulate`` running the agent's code for 30 devices. "Notified once per
step" is read twice: from the fleet's audit log (every desired state it published for the
version, per device) and from the devices' own ``desired_received`` events.
"""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import urlsplit

import pytest

from tests.fixtures.broker import FLEET_ACCOUNT, PUBLISHER_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.rollouts import (
    active_version,
    all_on,
    create_rollout,
    devices_by_id,
    received,
    rollout_audit,
    rollout_ended,
    rollout_status,
    told_of,
)
from tests.fixtures.simulator import publish_versions, start_simulator, write_faults
from tests.fixtures.waiting import wait_until

COUNT = 30
IDS = [f"sim-{index:04d}" for index in range(1, COUNT + 1)]


@pytest.fixture
def database_url(postgres_url) -> str:
    """PostgreSQL only: the controller's row locks are what a restart leans on."""
    return postgres_url


def _mid_wave(fleet, rollout_id: str) -> bool:
    """The second wave is under way: some of its devices told, not all of them healthy."""
    status = rollout_status(fleet, rollout_id)
    if status["wave"] != 2 or len(status["waves"]) < 2:
        return False
    states = status["waves"][1]["states"]
    return states.get("pending", 0) == 0 and states.get("healthy", 0) < sum(states.values())


@pytest.mark.timeout(900)
def test_controller_killed_and_broker_restarted_mid_wave_and_stuck_devices(
    tmp_path, mosquitto, make_bundle, database_url
):
    broker_url = mosquitto.url_for(FLEET_ACCOUNT)
    publisher_url = mosquitto.url_for(PUBLISHER_ACCOUNT)
    fleet = start_fleet(tmp_path, broker_url, database_url, publisher_broker_url=publisher_url)
    port = urlsplit(fleet.url).port
    sim = None
    try:
        publish_versions(fleet, make_bundle, ((v, v) for v in (1, 2, 3)))
        sim, faults = start_simulator(
            tmp_path, fleet.url, mosquitto, IDS, {"devices": {}}, "--interval", "1",
            "--keepalive", "5", "--inferences", "2", "--retry", "2")
        wait_until(lambda: sum(d["online"] for d in devices_by_id(fleet).values()) == COUNT,
                   timeout=120, interval=1, what=f"{COUNT} devices online")

        # 1. The controller (the whole fleet worker) is killed in the middle of wave 2.
        first = create_rollout(fleet, 1, "--waves", "3,100%", "--bake", "2")
        wait_until(lambda: _mid_wave(fleet, first["id"]), timeout=120, interval=0.1,
                   what="the second wave under way")
        fleet.kill9()
        fleet = start_fleet(tmp_path, broker_url, database_url, port=port,
                            publisher_broker_url=publisher_url)
        done = rollout_ended(fleet, first["id"], timeout=240)
        assert done["status"] == "completed", done
        assert all(w["states"] == {"healthy": w["devices"]} for w in done["waves"]), done

        # 2. The broker is restarted in the middle of wave 2.
        second = create_rollout(fleet, 2, "--waves", "3,100%", "--bake", "2")
        wait_until(lambda: _mid_wave(fleet, second["id"]), timeout=120, interval=0.1,
                   what="the second wave under way")
        mosquitto.stop()
        mosquitto.start()
        done = rollout_ended(fleet, second["id"], timeout=300)
        assert done["status"] == "completed", done
        assert all(w["states"] == {"healthy": w["devices"]} for w in done["waves"]), done

        # Each device was told of each version once, and says it received it once.
        wait_until(lambda: all_on(fleet, 2),
                   timeout=60, interval=1, what="every device on v2")
        for version in (1, 2):
            told = told_of(fleet, version)
            assert told == Counter(dict.fromkeys(IDS, 1)), (version, told)
            got = Counter({d: received(fleet, d, version) for d in IDS})
            assert got == Counter(dict.fromkeys(IDS, 1)), (version, got)

        # 3. Three devices are offline through their wave: re-driven, then stuck; the
        # rollout completes without them.
        offline = IDS[:3]
        write_faults(faults, {"devices": {d: {"offline": True} for d in offline}})
        wait_until(lambda: not any(devices_by_id(fleet)[d]["online"] for d in offline),
                   timeout=60, interval=1, what="three devices offline")
        third = create_rollout(fleet, 3, "--waves", "100%", "--bake", "2", "--stuck-timeout", "4",
                        "--max-redrives", "1")
        done = rollout_ended(fleet, third["id"], timeout=240)
        assert done["status"] == "completed", done
        assert done["waves"][0]["states"] == {"healthy": COUNT - 3, "stuck": 3}, done
        listed = fleet.cli("rollout", "status", third["id"], "--devices", "--state", "stuck",
                           "--json")
        stuck = json.loads(listed.stdout)["devices"]
        assert sorted(d["device_id"] for d in stuck) == offline
        assert all(d["redrives"] == 1 for d in stuck), stuck
        actions = [e["action"] for e in rollout_audit(fleet, third["id"])]
        assert "rollout.redrive" in actions and "rollout.stuck" in actions, actions

        # Back online, they pick up the desired state that waited for them (retained).
        write_faults(faults, {"devices": {}})
        wait_until(lambda: all(active_version(devices_by_id(fleet)[d]) == 3 for d in offline),
                   timeout=120, interval=1, what="the stuck devices on v3 once back")
    finally:
        if sim is not None:
            sim.terminate()
        fleet.terminate()
