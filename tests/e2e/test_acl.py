"""A device cannot speak for another: the broker's ACL refuses it, and without the ACL the
fleet's ingest still does.

Real mosquitto with ``deploy/mosquitto/edgefleet.acl`` and per-device accounts; real
``edge-fleet serve``.
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
from fleet.local_broker import LocalBroker
from tests.fixtures.broker import FLEET_ACCOUNT, RawClient
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until


def _beat(device_id: str, seq: int = 1) -> bytes:
    return encode(HeartbeatTelemetry(
        device_id=device_id, seq=seq, sent_at=utcnow(), uptime_s=1, cpu_percent=1,
        rss_mb=1, inference_count=0, error_count=0,
    ))


def test_broker_refuses_a_device_publishing_as_another(fleet_server, mosquitto):
    device_a = RawClient(mosquitto.url_for("dev-a"))
    try:
        own = device_a.publish(topic("dev-a", "telemetry"), _beat("dev-a"))
        forged = device_a.publish(topic("dev-b", "telemetry"), _beat("dev-b"))
        desired = device_a.publish(topic("dev-a", "desired"), b"{}")  # devices never write it
        assert own not in device_a.refusals
        assert forged in device_a.refusals and desired in device_a.refusals
    finally:
        device_a.close()
    wait_until(lambda: fleet_server.device("dev-a"), timeout=10, what="dev-a's own message")
    time.sleep(0.5)
    assert fleet_server.device("dev-b") is None


def test_a_device_cannot_read_another_devices_desired_state(mosquitto):
    received: list[str] = []
    mosquitto.url_for("dev-a")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edgefleet-agent-dev-a",
                         protocol=paho.MQTTv5)
    client.username_pw_set("dev-a", mosquitto.passwords["dev-a"])
    client.on_message = lambda c, u, message: received.append(message.topic)
    subscribed: list = []
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.append(codes)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    fleet = RawClient(mosquitto.url_for(FLEET_ACCOUNT))
    try:
        client.subscribe([(topic("dev-a", "desired"), 1), (topic("dev-b", "desired"), 1)])
        wait_until(lambda: subscribed, timeout=5, what="SUBACK")
        fleet.publish(topic("dev-b", "desired"), b"for dev-b only")
        fleet.publish(topic("dev-a", "desired"), b"for dev-a")
        wait_until(lambda: received, timeout=5, what="dev-a's own desired state")
        time.sleep(0.3)
    finally:
        fleet.close()
        client.disconnect()
        client.loop_stop()
    assert received == [topic("dev-a", "desired")]


@pytest.mark.parametrize("password", ["wrong", None])
def test_unknown_or_anonymous_clients_are_refused(mosquitto, password):
    refused: list = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder",
                         protocol=paho.MQTTv5)
    if password:
        client.username_pw_set("dev-a", password)
    client.on_connect = lambda c, u, flags, code, props: refused.append(code.is_failure)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        wait_until(lambda: refused, timeout=5, what="CONNACK")
    finally:
        client.loop_stop()
    assert refused == [True]


def test_without_the_acl_the_fleet_still_refuses_the_impersonation(tmp_path, database_url):
    """Boundary: an open broker (ACL off), as in a misconfigured deployment."""
    with LocalBroker(tmp_path / "open-broker") as broker:
        fleet = start_fleet(tmp_path, broker.url, database_url)
        client = RawClient(broker.url)
        try:
            client.publish(topic("dev-b", "telemetry"), _beat("dev-a"))
            wait_until(
                lambda: fleet.get("/api/v1/metrics").json()["ingest"]["rejected"].get(
                    "wrong_device") == 1,
                timeout=10, what="the ingest refusal",
            )
            assert fleet.device("dev-b") is None and fleet.device("dev-a") is None
        finally:
            client.close()
            fleet.terminate()
