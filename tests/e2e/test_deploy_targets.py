"""Whom a deployment reaches, and whether they got there: unknown ids are refused by name,
and every device shows what it was told beside what it runs.

Real ``edge-fleet serve`` (SQLite and PostgreSQL), real broker, real enrolled agents, the
CLI run as an operator would.
"""

from __future__ import annotations

import json

from tests.fixtures.waiting import wait_until


def _deploy(fleet_server, *devices: str, version: int = 1, extra: tuple[str, ...] = ()):
    args = [arg for device in devices for arg in ("--device", device)]
    return fleet_server.cli("deploy", "detector", "--version", str(version), *args, *extra)


def test_a_deployment_naming_unknown_devices_is_refused_and_names_them(
    fleet_server, mosquitto, agents, make_bundle
):
    assert fleet_server.cli("bundle", "publish", str(make_bundle().path)).returncode == 0
    agents.start("cam-1", mosquitto)
    wait_until(lambda: fleet_server.device("cam-1"), timeout=10, what="cam-1 registered")

    refused = _deploy(fleet_server, "cam-1", "cam-99", "cam-77")
    assert refused.returncode == 1
    assert "unknown devices: cam-77, cam-99" in refused.stderr
    assert fleet_server.device("cam-1")["desired"] is None, "nothing was deployed at all"

    response = fleet_server.client().post(
        "/api/v1/deployments", json={"bundle": "detector", "version": 1, "devices": ["cam-99"]})
    assert response.status_code == 404 and response.json()["reason"] == "unknown_devices"

    allowed = _deploy(fleet_server, "cam-1", "cam-99", extra=("--allow-unknown",))
    assert allowed.returncode == 0, allowed.stderr
    assert "cam-99: detector v1 (generation 1)" in allowed.stdout


def test_a_device_shows_what_it_was_told_beside_what_it_runs(
    fleet_server, mosquitto, agents, make_bundle
):
    assert fleet_server.cli("bundle", "publish", str(make_bundle().path)).returncode == 0
    agents.enroll("cam-2", fleet_server.url)
    agents.start("cam-2", mosquitto)
    agents.start("cam-3", mosquitto)  # not enrolled: it refuses every desired state
    for device_id in ("cam-2", "cam-3"):
        wait_until(lambda d=device_id: fleet_server.device(d), timeout=10, what=device_id)
    assert fleet_server.device("cam-2")["in_sync"] is None, "nothing desired yet"

    assert _deploy(fleet_server, "cam-2", "cam-3").returncode == 0
    synced = wait_until(lambda: (d := fleet_server.device("cam-2")) and d["in_sync"] and d,
                        timeout=30, what="cam-2 in sync")
    assert synced["desired"]["bundle"] == "detector" and synced["desired"]["version"] == 1
    assert synced["desired"]["generation"] == 1
    assert synced["active_model"] == {"name": "detector", "version": 1}
    wait_until(lambda: any(e["event"] == "desired_rejected"
                           for e in fleet_server.events("cam-3")),
               timeout=20, what="cam-3 refusing the desired state")
    stuck = fleet_server.device("cam-3")
    assert stuck["in_sync"] is False and stuck["desired"]["generation"] == 1
    assert stuck["active_model"] is None

    listed = fleet_server.cli("devices", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[1]: line for line in listed.stdout.splitlines()
             if "cam-" in line}
    assert "detector v1 (gen 1)" in lines["cam-2"] and "yes" in lines["cam-2"]
    assert "detector v1 (gen 1)" in lines["cam-3"]
    shown = json.loads(fleet_server.cli("devices", "show", "cam-3").stdout)
    assert shown["in_sync"] is False
