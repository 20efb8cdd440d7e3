"""A device cannot speak for another, listen in on the fleet, or take another client's
identity: the broker refuses it, and without the broker's rules the fleet's ingest still
refuses the impersonation.

Real mosquitto with the production configuration from ``deploy/mosquitto`` (accounts made
by its ``add-account.sh``); real ``edge-fleet serve`` and ``edge-agent run``.
"""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
from fleet.local_broker import LocalBroker
from tests.fixtures.broker import FLEET_ACCOUNT, RawClient, client_id_for
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
        # Sent last on the same connection: once the fleet has it, it would have had the
        # forged one (which came before) too.
        marker = device_a.publish(topic("dev-a", "telemetry"), _beat("dev-a", seq=2))
        assert own not in device_a.refusals and marker not in device_a.refusals
        assert forged in device_a.refusals and desired in device_a.refusals
    finally:
        device_a.close()
    wait_until(lambda: len(fleet_server.get("/api/v1/devices/dev-a/telemetry").json()) == 2,
               timeout=10, what="dev-a's two heartbeats")
    assert fleet_server.device("dev-b") is None


def test_a_device_cannot_read_another_devices_desired_state(mosquitto):
    received: list[str] = []
    mosquitto.url_for("dev-a")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id_for("dev-a"),
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
        # Published after dev-b's on the same connection: had dev-b's been delivered, it
        # would have come first.
        wait_until(lambda: received, timeout=5, what="dev-a's own desired state")
    finally:
        fleet.close()
        client.disconnect()
        client.loop_stop()
    assert received == [topic("dev-a", "desired")]


def _connack(broker: LocalBroker, user: str, client_id: str):
    """Connect as ``user`` with ``client_id``: the broker's CONNACK reason code."""
    answers: list = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5, reconnect_on_failure=False)
    client.username_pw_set(user, broker.passwords[user])
    client.on_connect = lambda c, u, flags, code, props: answers.append(code)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        return wait_until(lambda: answers, timeout=10, what="CONNACK")[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_device_cannot_siphon_the_fleets_shared_telemetry(fleet_server, mosquitto):
    """Granted, ``$share/fleet/...`` would make the broker hand every other message to the
    thief instead of the fleet (it stored 20 of 60)."""
    thief = RawClient(mosquitto.url_for("dev-a"))  # dev-a's own client id: a valid session
    victim = RawClient(mosquitto.url_for("dev-b"))
    try:
        stolen: list[str] = []
        granted: list = []
        thief.client.on_message = lambda c, u, message: stolen.append(message.topic)
        thief.client.on_subscribe = lambda c, u, mid, codes, props: granted.extend(codes)
        thief.client.subscribe("$share/fleet/edgefleet/v1/devices/+/telemetry", qos=1)
        code = wait_until(lambda: granted, timeout=10, what="SUBACK")[0]
        assert code.is_failure, f"dev-a joined the fleet's shared group ({code})"
        for seq in range(1, 31):
            victim.publish(topic("dev-b", "telemetry"), _beat("dev-b", seq))
        rows = wait_until(
            lambda: len(got := fleet_server.get("/api/v1/devices/dev-b/telemetry").json()) >= 30
            and got, timeout=30, what="dev-b's 30 heartbeats stored",
        )
        assert [row["seq"] for row in rows] == list(range(1, 31)), "the fleet lost messages"
        assert stolen == [], "dev-a received dev-b's telemetry"
    finally:
        thief.close()
        victim.close()


def test_a_device_cannot_take_an_agents_or_the_fleets_client_id(fleet_server, mosquitto, agents):
    """Taking a connected client's id would kick it off (and fire its Last Will: offline)."""
    agents.start("dev-b", mosquitto)
    wait_until(lambda: (d := fleet_server.device("dev-b")) and d["online"], timeout=20,
               what="dev-b online")
    mosquitto.url_for("dev-a")
    for victim in (client_id_for("dev-b"), client_id_for(FLEET_ACCOUNT)):
        connack = _connack(mosquitto, "dev-a", victim)
        assert connack.is_failure, f"dev-a connected with {victim}'s client id ({connack})"
    # The broker kicks the old session before it answers CONNECT: by now it would show.
    assert "already connected, closing old connection" not in mosquitto.log_path.read_text()
    assert fleet_server.device("dev-b")["online"], "dev-b went offline"
    # A device's own client id is the only one it gets: an account without one is refused.
    own = _connack(mosquitto, "dev-a", client_id_for("dev-a"))
    assert not own.is_failure, f"dev-a refused with its own client id ({own})"


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
