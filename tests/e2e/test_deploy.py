"""Deploying signed bundles end to end: real fleet, real broker, real enrolled agent.

``edge-fleet bundle publish`` and ``edge-fleet deploy`` run as an operator would; the
agent downloads over HTTP from the fleet's /repo/, verifies with python-tuf, installs into
its A/B slots after an onnxruntime health check, and reports every step as events that the
fleet stores. Runs over SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess

from agent.contract import BundleRef, DesiredState, encode, topic, utcnow
from fleet.trust.director import sign_desired
from fleet.trust.repository import FleetRepository
from tests.fixtures.processes import console_script
from tests.fixtures.waiting import wait_until


def _active(fleet_server, device_id: str) -> dict | None:
    device = fleet_server.device(device_id)
    return device["active_model"] if device else None


def _rollback(agents, device_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*console_script("edge-agent"), "rollback", "--state-dir",
         str(agents.state_dir(device_id))],
        capture_output=True, text=True, timeout=120,
    )


def _deploy(fleet_server, version: int, device_id: str, token: str | None = None):
    return fleet_server.cli("deploy", "detector", "--version", str(version),
                            "--device", device_id, token=token)


def test_deploy_update_rollback_and_refusals(
    fleet_server, mosquitto, agents, raw_mqtt, make_bundle
):
    for version, seed in ((1, 0), (2, 1)):
        bundle = make_bundle(version=version, seed=seed)
        published = fleet_server.cli("bundle", "publish", str(bundle.path))
        assert published.returncode == 0, published.stderr
        assert f"published detector v{version}" in published.stdout
    assert "enrolled with" in agents.enroll("edge-7", fleet_server.url)
    agent = agents.start("edge-7", mosquitto)
    wait_until(lambda: fleet_server.device("edge-7"), timeout=10, what="edge-7 registered")

    deployed = _deploy(fleet_server, 1, "edge-7")
    assert deployed.returncode == 0, deployed.stderr
    assert "edge-7: detector v1 (generation 1)" in deployed.stdout
    wait_until(lambda: _active(fleet_server, "edge-7") == {"name": "detector", "version": 1},
               timeout=20, what="v1 active")
    # Events and the reported state travel on separate channels: the event may land later.
    wait_until(lambda: [e["event"] for e in fleet_server.events("edge-7")] == [
        "started", "desired_received", "downloading", "verified", "installed", "healthy"
    ], timeout=20, what="the install's events, in order")

    assert _deploy(fleet_server, 2, "edge-7").returncode == 0
    wait_until(lambda: _active(fleet_server, "edge-7") == {"name": "detector", "version": 2},
               timeout=20, what="v2 active")

    # On the device: `edge-agent rollback` while the agent runs goes to the agent itself,
    # which switches and tells the fleet where from and where to.
    rolled = _rollback(agents, "edge-7")
    assert rolled.returncode == 0, rolled.stderr
    assert "rolled back to detector v1 from detector v2" in rolled.stdout
    wait_until(lambda: _active(fleet_server, "edge-7") == {"name": "detector", "version": 1},
               timeout=10, what="the fleet to see v1 active")
    rolled_back = wait_until(
        lambda: [e["detail"] for e in fleet_server.events("edge-7") if e["event"] == "rolled_back"],
        timeout=10, what="rolled_back reported")
    assert [(d["from"], d["to"]) for d in rolled_back] == [
        ({"name": "detector", "version": 2}, {"name": "detector", "version": 1})
    ]
    # A second rollback would go forward to v2 again: refused, and nothing changes.
    again = _rollback(agents, "edge-7")
    assert again.returncode == 1, again.stdout
    assert "already rolled back from detector v2 to detector v1" in again.stderr
    assert _active(fleet_server, "edge-7") == {"name": "detector", "version": 1}

    # From the fleet, a rollback is a newer desired state naming the older bundle, and an
    # update to a bundle still in the other slot needs no download.
    assert _deploy(fleet_server, 2, "edge-7").returncode == 0
    wait_until(lambda: _active(fleet_server, "edge-7") == {"name": "detector", "version": 2},
               timeout=20, what="v2 again")
    assert _deploy(fleet_server, 1, "edge-7").returncode == 0
    wait_until(lambda: _active(fleet_server, "edge-7") == {"name": "detector", "version": 1},
               timeout=20, what="back on v1")
    wait_until(lambda: [e["event"] for e in fleet_server.events("edge-7")][-4:] == [
        "desired_received", "healthy", "desired_received", "healthy"],
        timeout=20, what="both installs' events")

    # A validly signed but older desired state (generation 3 -> v2) replayed by whoever can
    # publish on the broker is refused.
    director = FleetRepository(fleet_server.data_dir).online_signer("director")
    replay = DesiredState(device_id="edge-7", generation=3,
                          bundle=BundleRef(name="detector", version=2), issued_at=utcnow())
    raw_mqtt.publish(topic("edge-7", "desired"), sign_desired(replay, director))
    # An unsigned desired state is refused too.
    unsigned = DesiredState(device_id="edge-7", generation=99,
                            bundle=BundleRef(name="detector", version=2), issued_at=utcnow())
    raw_mqtt.publish(topic("edge-7", "desired"), encode(unsigned))

    def refusals():
        reasons = [e["detail"].get("reason") for e in fleet_server.events("edge-7")
                   if e["event"] == "desired_rejected"]
        return reasons if len(reasons) >= 2 else None

    reasons = wait_until(refusals, timeout=10, what="both refusals reported")
    assert reasons == ["stale_generation", "unsigned_desired_state"]
    assert _active(fleet_server, "edge-7") == {"name": "detector", "version": 1}
    assert "Traceback" not in agent.log()


def test_viewer_token_cannot_deploy_and_unknown_bundles_are_refused(fleet_server, make_bundle):
    created = fleet_server.cli("token", "create", "--role", "viewer")
    viewer = created.stdout.strip()
    refused = _deploy(fleet_server, 1, "edge-1", token=viewer)
    assert refused.returncode == 1
    assert "403" in refused.stderr and "operator" in refused.stderr
    missing = _deploy(fleet_server, 5, "edge-1")
    assert missing.returncode == 1 and "no published bundle detector v5" in missing.stderr
