"""Agents on a real broker, seen by a real fleet: presence, versions, Last Will, reconnect.

Everything is real: a private mosquitto, ``edge-fleet serve`` over SQLite and PostgreSQL,
``edge-agent run`` processes, HTTP to the running API. No mocks.
"""

from __future__ import annotations

import time

from agent import __version__
from tests.fixtures.waiting import wait_until


def _online(fleet_server, device_id: str) -> dict | None:
    device = fleet_server.device(device_id)
    return device if device and device["online"] else None


def test_two_agents_listed_online_then_kill9_goes_offline_by_last_will(
    fleet_server, mosquitto, agents
):
    started = time.monotonic()
    first = agents.start("cam-01", mosquitto)
    agents.start("cam-02", mosquitto)

    def both_online_with_heartbeat():
        listed = {d["id"]: d for d in fleet_server.get("/api/v1/devices").json()}
        ready = all(
            listed.get(i, {}).get("online") and listed[i]["heartbeat"]
            for i in ("cam-01", "cam-02")
        )
        return listed if ready else None

    listed = wait_until(both_online_with_heartbeat, timeout=10, what="both agents online")
    assert time.monotonic() - started < 10
    for device_id in ("cam-01", "cam-02"):
        device = listed[device_id]
        assert device["agent_version"] == __version__
        assert device["platform"]["runtimes"]["onnxruntime"]
        assert device["active_model"] is None
        beat = device["heartbeat"]
        assert beat["rss_mb"] > 0 and beat["uptime_s"] >= 0
        assert beat["inference_count"] == 0 and beat["latency_ms_p95"] is None

    killed_at = time.monotonic()
    first.kill9()
    wait_until(
        lambda: not fleet_server.device("cam-01")["online"],
        timeout=10,
        what="cam-01 offline via its Last Will",
    )
    assert time.monotonic() - killed_at < 10
    assert fleet_server.device("cam-02")["online"], "the other agent must stay online"


def test_agent_reconnects_after_the_broker_restarts(fleet_server, mosquitto, agents):
    agents.start("gw-01", mosquitto)
    device = wait_until(
        lambda: (d := _online(fleet_server, "gw-01")) and d["heartbeat"] and d,
        timeout=10,
        what="gw-01 online with a heartbeat",
    )
    before = device["heartbeat"]["sent_at"]

    mosquitto.stop()
    time.sleep(2)
    mosquitto.start()

    # Both the fleet and the agent come back by themselves; heartbeats flow again.
    wait_until(
        lambda: (d := _online(fleet_server, "gw-01")) and d["heartbeat"]["sent_at"] > before,
        timeout=30,
        what="gw-01 heartbeats after the broker restart",
    )


def test_clean_stop_reports_offline(fleet_server, mosquitto, agents):
    agent = agents.start("gw-02", mosquitto)
    wait_until(lambda: _online(fleet_server, "gw-02"), timeout=10, what="gw-02 online")
    assert agent.terminate() == 0
    wait_until(
        lambda: not fleet_server.device("gw-02")["online"], timeout=5, what="gw-02 offline"
    )
    assert "agent stopped" in agent.log()
