"""What devices send while a fleet worker is down is stored once it is back.

Real mosquitto, real ``edge-fleet serve`` restarted with the same worker id: the broker
keeps the worker's session and queues its messages meanwhile.
"""

from __future__ import annotations

from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
from tests.fixtures.broker import FLEET_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until


def test_messages_sent_while_the_worker_is_down_are_stored_after_it_restarts(
    tmp_path, mosquitto, raw_mqtt, database_url
):
    fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)
    try:
        raw_mqtt.publish(topic("dev-d", "telemetry"), encode(_beat(1)))
        wait_until(lambda: fleet.device("dev-d"), timeout=10, what="dev-d stored")
    finally:
        assert fleet.terminate() == 0
    for seq in range(2, 12):
        raw_mqtt.publish(topic("dev-d", "telemetry"), encode(_beat(seq)))

    fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)
    try:
        wait_until(
            lambda: fleet.device("dev-d")["heartbeat"]["uptime_s"] == 11.0,
            timeout=15,
            what="the heartbeats sent during the outage",
        )
        accepted = fleet.get("/api/v1/metrics").json()["ingest"]["accepted"]
        assert accepted.get("heartbeat") == 10
    finally:
        fleet.terminate()


def _beat(seq: int) -> HeartbeatTelemetry:
    return HeartbeatTelemetry(
        device_id="dev-d", seq=seq, sent_at=utcnow(), uptime_s=float(seq), cpu_percent=1.0,
        rss_mb=10.0, inference_count=0, error_count=0,
    )
