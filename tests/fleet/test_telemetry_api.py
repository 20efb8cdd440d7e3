"""Heartbeats are stored once per (device, seq) and served as a time series.

Real broker, real ``edge-fleet serve`` over SQLite and PostgreSQL, heartbeats published
with a raw client (duplicates included, as QoS 1 redelivery would cause).
"""

from __future__ import annotations

from datetime import timedelta

from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
from tests.fixtures.waiting import wait_until


def _beat(device_id: str, seq: int, minutes_ago: float = 0) -> bytes:
    return encode(HeartbeatTelemetry(
        device_id=device_id, seq=seq, sent_at=utcnow() - timedelta(minutes=minutes_ago),
        uptime_s=float(seq), cpu_percent=10.0 + seq, rss_mb=50.0, inference_count=seq,
        error_count=0, latency_ms_p95=2.5, outbox_depth=0,
    ))


def test_duplicates_make_no_second_row_and_since_filters(fleet_server, raw_mqtt):
    for seq in (1, 2, 3, 2, 3, 4, 1):
        raw_mqtt.publish(topic("cam-9", "telemetry"), _beat("cam-9", seq, minutes_ago=10 - seq))
    raw_mqtt.publish(topic("cam-8", "telemetry"), _beat("cam-8", 1))

    def rows():
        got = fleet_server.get("/api/v1/devices/cam-9/telemetry").json()
        return got if len(got) >= 4 else None

    stored = wait_until(rows, timeout=10, what="4 heartbeats")
    metrics = wait_until(
        lambda: (m := fleet_server.get("/api/v1/metrics").json()["ingest"])["accepted"].get(
            "heartbeat") == 8 and m,
        timeout=10, what="all 8 messages processed",
    )
    assert [row["seq"] for row in fleet_server.get("/api/v1/devices/cam-9/telemetry").json()] \
        == [1, 2, 3, 4]
    assert metrics["heartbeats_stored"] == 5  # 4 for cam-9, 1 for cam-8: duplicates ignored
    assert metrics["lag_s_max"] >= 5 * 60  # the oldest was sent 9 minutes "ago"
    assert stored[0]["cpu_percent"] == 11.0

    since = (utcnow() - timedelta(minutes=7.5)).isoformat()
    with fleet_server.client() as client:
        recent = client.get("/api/v1/devices/cam-9/telemetry", params={"since": since}).json()
    assert [row["seq"] for row in recent] == [3, 4]

    summary = fleet_server.get("/api/v1/telemetry/summary?minutes=5").json()
    assert summary["heartbeats"] == 5 and summary["devices_reporting"] == 2
    assert summary["devices"] == 2 and summary["latency_ms_p95_max"] == 2.5


def test_telemetry_api_needs_a_token_and_checks_its_arguments(fleet_server):
    import httpx

    assert httpx.get(f"{fleet_server.url}/api/v1/devices/x/telemetry").status_code == 401
    assert fleet_server.get("/api/v1/devices/x/telemetry?limit=0").status_code == 422
    assert fleet_server.get("/api/v1/devices/x/telemetry?since=yesterday").status_code == 422
    assert fleet_server.get("/api/v1/devices/x/telemetry").json() == []
