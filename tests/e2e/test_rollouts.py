"""Staged rollouts end to end: simulated devices running the agent's code, a real fleet
(SQLite) with its rollout controller, a real broker.

The only injected thing is the simulator's fault file (a health-check verdict after the
real check: ``agent/simulate/device.py``). A good bundle goes through every wave; a bundle
that fails its health check on 30% of devices is halted in the first wave that shows it,
every device it updated is rolled back (``--on-failure rollback-all``: earlier waves too;
test_rollout_acceptance.py proves the default, the failing wave only), and no device of a
later wave ever gets it.
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.rollouts import active_version, create_rollout, devices_by_id, rollout_status
from tests.fixtures.simulator import publish_versions, start_simulator, write_faults
from tests.fixtures.waiting import wait_until

COUNT = 20
IDS = [f"sim-{index:04d}" for index in range(1, COUNT + 1)]
FAILING = IDS[::3]  # 7 of 20: about a third fail the health check of the bad bundle


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: the 200-device acceptance (test_rollout_acceptance.py) and the restart
    test run on PostgreSQL."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _rollout(fleet, version: int, *options: str) -> dict:
    return create_rollout(fleet, version, "--waves", "1,5,100%", "--bake", "2", *options)


@pytest.mark.timeout(600)
def test_a_good_bundle_goes_through_every_wave_and_a_bad_one_is_halted_and_rolled_back(
    tmp_path, fleet_server, mosquitto, make_bundle
):
    publish_versions(fleet_server, make_bundle, ((1, 0), (2, 1), (3, 2)))
    sim, faults = start_simulator(tmp_path, fleet_server.url, mosquitto, IDS, {"devices": {}},
                                  "--interval", "1", "--keepalive", "5", "--inferences", "5")
    try:
        wait_until(lambda: all((d := devices_by_id(fleet_server).get(i)) and d["online"]
                               for i in IDS), timeout=90, interval=0.5, what="20 devices")

        # A good bundle (v1 first: every device then has a version to compare with).
        first = _rollout(fleet_server, 1)
        done = wait_until(lambda: (s := rollout_status(fleet_server, first["id"]))["status"]
                          in ("completed", "halted") and s, timeout=180, interval=1,
                          what="the first rollout to end")
        assert done["status"] == "completed", done
        assert [w["devices"] for w in done["waves"]] == [1, 4, 15]
        assert all(w["states"] == {"healthy": w["devices"]} for w in done["waves"]), done["waves"]
        assert all(active_version(d) == 1 for d in devices_by_id(fleet_server).values())
        second = _rollout(fleet_server, 2)
        wait_until(lambda: rollout_status(fleet_server, second["id"])["status"] == "completed",
                   timeout=180, interval=1, what="the second good rollout")

        # A bad bundle: a third of the devices fail its health check.
        write_faults(faults, {"devices": {i: {"fail_health_check": True} for i in FAILING}})
        bad = _rollout(fleet_server, 3, "--on-failure", "rollback-all")
        halted = wait_until(lambda: (s := rollout_status(fleet_server, bad["id"]))["status"]
                            in ("completed", "halted") and s, timeout=180, interval=1,
                            what="the bad rollout to end")
        assert halted["status"] == "halted", halted
        assert "install_failure_rate" in halted["reason"]
        halted_wave = halted["wave"]
        later = [w for w in halted["waves"] if w["wave"] > halted_wave]
        assert all(w["states"] == {"pending": w["devices"]} for w in later), halted
        in_wave = halted["waves"][halted_wave - 1]["states"]
        assert in_wave.get("failed", 0) >= 1 and "healthy" not in in_wave, in_wave

        # Every device it updated goes back to v2; nobody outside ever got v3.
        not_on_v2: dict = {}

        def rolled_back():
            listed = devices_by_id(fleet_server)
            not_on_v2.clear()
            not_on_v2.update({i: (active_version(d), d["desired"]) for i, d in listed.items()
                              if active_version(d) != 2})
            return not not_on_v2
        try:
            wait_until(rolled_back, timeout=120, interval=1, what="every device back on v2")
        except AssertionError:
            rows = rollout_status(fleet_server, bad["id"])
            raise AssertionError(f"not on v2: {not_on_v2}; rollout: {rows}") from None
        audit = json.loads(fleet_server.cli("audit", "list", "--subject",
                                            f"rollout:{bad['id']}", "--json").stdout)
        actions = [entry["action"] for entry in audit]
        assert "rollout.halt" in actions, actions
        if any(w["states"].get("rolled_back") for w in halted["waves"]):
            assert "rollout.rollback" in actions, actions
        halt = next(entry for entry in audit if entry["action"] == "rollout.halt")
        gate = next(g for g in halt["details"]["gates"] if g["gate"] == "install_failure_rate")
        assert gate["verdict"] == "fail" and gate["value"] > gate["threshold"]
        verified = fleet_server.cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        sim.terminate()
