"""A deployment made while the broker is away says so, and still arrives.

Real ``edge-fleet serve`` (SQLite and PostgreSQL), a real mosquitto stopped and started by
the test, a real enrolled agent.
"""

from __future__ import annotations

from tests.fixtures.waiting import wait_until


def _connected(fleet_server) -> bool:
    return bool(fleet_server.get("/healthz").json()["ingest_connected"])


def test_a_deployment_while_the_broker_is_away_says_so_and_arrives_later(
    fleet_server, mosquitto, agents, make_bundle
):
    assert fleet_server.cli("bundle", "publish", str(make_bundle().path)).returncode == 0
    agents.enroll("cam-1", fleet_server.url)
    agents.start("cam-1", mosquitto)
    wait_until(lambda: fleet_server.device("cam-1"), timeout=15, what="cam-1 registered")

    mosquitto.stop()
    wait_until(lambda: not _connected(fleet_server), timeout=30, what="the fleet to notice")
    deployed = fleet_server.cli("deploy", "detector", "--version", "1", "--device", "cam-1")
    assert deployed.returncode == 0, deployed.stderr
    assert "cam-1: detector v1 (generation 1)" in deployed.stdout
    assert "warning: not published yet" in deployed.stderr and "unreachable" in deployed.stderr

    mosquitto.start()
    wait_until(lambda: (d := fleet_server.device("cam-1")) and d["in_sync"], timeout=90,
               what="the desired state delivered once the broker is back")
