"""Bad device messages are refused, counted by reason, logged, and never stop ingest.

Real broker, real ``edge-fleet serve`` (SQLite and PostgreSQL); the bad messages are
published with a raw paho client because a real agent cannot produce them.
"""

from __future__ import annotations

import json

import pytest

from agent.contract import MAX_MESSAGE_BYTES, HeartbeatTelemetry, encode, topic, utcnow
from tests.fixtures.waiting import wait_until


def _heartbeat(device_id: str, seq: int, **overrides) -> HeartbeatTelemetry:
    fields = dict(
        device_id=device_id, seq=seq, sent_at=utcnow(), uptime_s=1.0, cpu_percent=2.0,
        rss_mb=30.0, inference_count=5, error_count=0,
    )
    return HeartbeatTelemetry(**{**fields, **overrides})


def _replace_once(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert payload.count(old) == 1, f"{old!r} not in {payload!r}"  # or the case tests nothing
    return payload.replace(old, new)


def _rejected(fleet_server) -> dict:
    return fleet_server.get("/api/v1/metrics").json()["ingest"]["rejected"]


# case -> (topic, payload, the reason it must be counted under)
BAD_MESSAGES = {
    "malformed_json": (topic("dev-a", "telemetry"), b"{not json", "malformed_json"),
    "oversized": (topic("dev-a", "telemetry"), b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
    "negative_cpu": (
        topic("dev-a", "telemetry"),
        json.dumps({**json.loads(encode(_heartbeat("dev-a", 1))), "cpu_percent": -5}).encode(),
        "invalid",
    ),
    "heartbeat_on_drift_channel": (
        topic("dev-a", "drift"), encode(_heartbeat("dev-a", 1)), "invalid"
    ),
    "nested_too_deep": (topic("dev-a", "telemetry"), b"[" * 60_000, "malformed_json"),
    "infinite_number": (  # valid JSON, but not a finite float
        topic("dev-a", "telemetry"),
        _replace_once(encode(_heartbeat("dev-a", 1)), b'"uptime_s":1.0', b'"uptime_s":1e999'),
        "invalid",
    ),
    "infinity_literal": (  # not JSON at all
        topic("dev-a", "telemetry"),
        _replace_once(encode(_heartbeat("dev-a", 1)), b'"uptime_s":1.0', b'"uptime_s":Infinity'),
        "malformed_json",
    ),
    "version_over_int32": (
        topic("dev-a", "reported"),
        json.dumps({
            "device_id": "dev-a", "seq": 1, "sent_at": "2026-01-01T00:00:00Z",
            "agent_version": "1", "active_model": {"name": "m", "version": 2**31},
            "platform": {"system": "L", "release": "1", "machine": "x", "python": "3"},
        }).encode(),
        "invalid",
    ),
    # dev-a's connection publishing a message that claims to be dev-b
    "wrong_device": (topic("dev-a", "telemetry"), encode(_heartbeat("dev-b", 1)), "wrong_device"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_message_is_refused_counted_logged_and_next_valid_lands(
    fleet_server, raw_mqtt, case
):
    topic_name, payload, reason = BAD_MESSAGES[case]
    raw_mqtt.publish(topic_name, payload)
    wait_until(
        lambda: _rejected(fleet_server).get(reason) == 1, timeout=10, what=f"{reason} counted"
    )
    assert f"refused message on {topic_name}: {reason}:" in fleet_server.log()

    raw_mqtt.publish(topic("dev-a", "telemetry"), encode(_heartbeat("dev-a", 7, uptime_s=42.0)))
    device = wait_until(
        lambda: (d := fleet_server.device("dev-a")) and d["heartbeat"] and d,
        timeout=10,
        what="the next valid heartbeat stored",
    )
    assert device["heartbeat"]["uptime_s"] == 42.0
    assert fleet_server.device("dev-b") is None, "no device may be created by impersonation"
    assert fleet_server.process.poll() is None


def test_wrong_device_message_changes_nothing_for_the_impersonated_device(
    fleet_server, raw_mqtt
):
    raw_mqtt.publish(topic("dev-b", "telemetry"), encode(_heartbeat("dev-b", 1, uptime_s=1.0)))
    wait_until(lambda: fleet_server.device("dev-b"), timeout=10, what="dev-b registered")
    raw_mqtt.publish(topic("dev-a", "telemetry"), encode(_heartbeat("dev-b", 2, uptime_s=99.0)))
    wait_until(
        lambda: _rejected(fleet_server).get("wrong_device") == 1, timeout=10, what="refusal"
    )
    assert fleet_server.device("dev-b")["heartbeat"]["uptime_s"] == 1.0


def test_redelivered_heartbeat_does_not_overwrite_a_newer_one(fleet_server, raw_mqtt):
    raw_mqtt.publish(topic("dev-c", "telemetry"), encode(_heartbeat("dev-c", 10, uptime_s=10.0)))
    wait_until(lambda: fleet_server.device("dev-c"), timeout=10, what="dev-c stored")
    raw_mqtt.publish(topic("dev-c", "telemetry"), encode(_heartbeat("dev-c", 9, uptime_s=9.0)))
    raw_mqtt.publish(topic("dev-c", "telemetry"), encode(_heartbeat("dev-c", 11, uptime_s=11.0)))
    wait_until(
        lambda: fleet_server.device("dev-c")["heartbeat"]["uptime_s"] == 11.0,
        timeout=10,
        what="seq 11 applied",
    )
    accepted = fleet_server.get("/api/v1/metrics").json()["ingest"]["accepted"]
    assert accepted["heartbeat"] == 3  # all three processed; seq 9 applied nothing
