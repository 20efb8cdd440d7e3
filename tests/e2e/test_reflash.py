"""A re-flashed device comes back at once; its former incarnation's messages stay refused.

Real broker (production accounts), real ``edge-fleet serve`` on PostgreSQL (the database
beside that broker in the field; the rules run on SQLite and PostgreSQL in
``tests/fleet/test_reflash.py``), a real ``edge-agent run``. The first incarnation's state
file is made by the agent's own ``AgentState`` with its seq counter where a clock 10 years
ahead would have started it: after the wipe the agent starts counting from today's clock,
below what the fleet stored, which is the case of a board whose clock is behind after a
re-flash (no fake clock in the agent needed). A raw MQTT subscriber captures the first
incarnation's messages off the broker; they are published again after the re-flash, as the
device's own account.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import datetime

import paho.mqtt.client as paho
import pytest

from agent.contract import TOPIC_ROOT
from agent.state import AgentState
from tests.fixtures.broker import RawClient, fleet_account
from tests.fixtures.waiting import wait_until

DEVICE = "cam-reflash"
TEN_YEARS_US = 10 * 365 * 24 * 3600 * 1_000_000
INTERVAL_S = 1.0


class _Capture:
    """The messages a device publishes, as the broker hands them to a fleet-role account:
    ``status`` and ``reported`` directly, telemetry and events through the fleet's shared
    group (a lone fleet worker subscribes directly, so the capture takes nothing from it)."""

    def __init__(self, url: str) -> None:
        self.raw = RawClient(url)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.raw.client.on_message = self._on_message
        for channel in ("status", "reported"):
            self.raw.client.subscribe(f"{TOPIC_ROOT}/+/{channel}", qos=1)
        for channel in ("telemetry", "events"):
            self.raw.client.subscribe(f"$share/fleet/{TOPIC_ROOT}/+/{channel}", qos=1)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if message.payload and f"/{DEVICE}/" in message.topic:
            with self._lock:
                self.messages.append((message.topic, bytes(message.payload), message.retain))

    def first(self, channel: str, containing: bytes = b"") -> tuple[str, bytes] | None:
        with self._lock:
            return next(((t, p) for t, p, _ in self.messages
                         if t.endswith(f"/{channel}") and containing in p), None)


def _snapshot(fleet_server) -> tuple[dict, list, list]:
    return (fleet_server.device(DEVICE),
            fleet_server.get(f"/api/v1/devices/{DEVICE}/telemetry").json(),
            fleet_server.events(DEVICE))


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_reflashed_device_is_online_at_once_and_old_incarnation_replays_change_nothing(
    fleet_server, mosquitto, agents, raw_mqtt
):
    state_dir = agents.state_dir(DEVICE)
    seeded = AgentState(state_dir)
    ahead = time.time_ns() // 1000 + TEN_YEARS_US
    seeded.put("seq", str(ahead))
    old_incarnation = seeded.incarnation
    seeded.close()
    capture = _Capture(mosquitto.url_for(fleet_account("capture")))
    try:
        first = agents.start(DEVICE, mosquitto, interval=INTERVAL_S)
        wait_until(lambda: (d := fleet_server.device(DEVICE)) and d["online"] and d["heartbeat"],
                   timeout=15, what="the first incarnation online with a heartbeat")
        wanted = {"status": b'"state":"online"', "reported": b"", "telemetry": b"",
                  "events": b'"event":"started"'}
        captured = wait_until(
            lambda: all(capture.first(c, w) for c, w in wanted.items())
            and [capture.first(c, w) for c, w in wanted.items()],
            timeout=10, what="the first incarnation's messages captured")
        assert all(old_incarnation.encode() in payload for _, payload in captured)
        assert first.terminate() == 0

        shutil.rmtree(state_dir)  # re-flashed: same id, new state directory
        second = agents.start(DEVICE, mosquitto, interval=INTERVAL_S)

        def back_with_new_heartbeats():
            device = fleet_server.device(DEVICE)
            if not (device and device["online"] and device["reflashed_at"]):
                return None
            rows = fleet_server.get(f"/api/v1/devices/{DEVICE}/telemetry").json()
            new = [row for row in rows if row["epoch"] == 1]
            applied = device["heartbeat"] and device["heartbeat"]["sent_at"] == max(
                row["sent_at"] for row in new) if new else False
            return (device, new) if len(new) >= 2 and applied else None

        device, new_rows = wait_until(back_with_new_heartbeats, timeout=20,
                                      what="the re-flashed device online, heartbeats applied")
        assert device["epoch"] == 1
        # Its seqs restarted below what the fleet had stored of the first incarnation.
        assert all(row["seq"] < ahead for row in new_rows)
        reflashed = [e for e in fleet_server.events(DEVICE) if e["event"] == "reflashed"]
        assert [e["detail"]["previous"] for e in reflashed] == [old_incarnation]
        # Its first heartbeat is stored within one interval of its first message (the
        # re-flash noticed), with 2 s for scheduling on a loaded machine.
        noticed = datetime.fromisoformat(reflashed[0]["received_at"])
        first_beat = min(datetime.fromisoformat(row["received_at"]) for row in new_rows)
        assert (first_beat - noticed).total_seconds() < INTERVAL_S + 2.0
        shown = fleet_server.cli("devices", "show", DEVICE)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["reflashed_at"] == device["reflashed_at"]
        assert second.terminate() == 0
        wait_until(lambda: not fleet_server.device(DEVICE)["online"], timeout=10,
                   what="the second incarnation offline after its clean stop")

        before = _snapshot(fleet_server)
        for topic_name, payload in captured:
            retained = topic_name.endswith(("/status", "/reported"))
            raw_mqtt.publish(topic_name, payload, retain=retained)
        wait_until(
            lambda: fleet_server.get("/api/v1/metrics").json()["ingest"]["rejected"].get(
                "stale_incarnation") == len(captured),
            timeout=10, what="the replays refused as stale_incarnation")
        assert _snapshot(fleet_server) == before
    finally:
        capture.raw.close()
