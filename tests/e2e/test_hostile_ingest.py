"""A hostile stream costs only itself: hundreds of good messages from several devices,
interleaved with every known class of bad message plus generated ones, over the real broker
(the shipped configuration) into a real ``edge-fleet serve`` (SQLite, then PostgreSQL).

The hostile messages come from authenticated devices, as from a compromised one: the
broker lets a device publish only under its own id, so everything a device can still send
is in here (garbage on its own topics, messages claiming thousands of other ids). Every
good message must be stored exactly once (replays included), every hostile one refused
and counted under its reason, the refused retained message cleared at the broker, and the
fleet's memory must stay bounded.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract import (
    MAX_MESSAGE_BYTES,
    EventMessage,
    HeartbeatTelemetry,
    encode,
    topic,
    utcnow,
)
from tests.fixtures.broker import client_id_for, fleet_account
from tests.fixtures.waiting import wait_until

GOOD_DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")
BEATS_PER_DEVICE = 40
EVENTS_PER_DEVICE = 20
FAKE_IDS = 2000
GENERATED = 60
RSS_GROWTH_LIMIT_MB = 60


def _beat(device_id: str, seq: int) -> bytes:
    return encode(HeartbeatTelemetry(
        device_id=device_id, seq=seq, sent_at=utcnow(), uptime_s=float(seq), cpu_percent=1.0,
        rss_mb=10.0, inference_count=seq, error_count=0, client_error_count=1,
    ))


def _event(device_id: str, seq: int) -> bytes:
    return encode(EventMessage(
        device_id=device_id, seq=seq, sent_at=utcnow(), event="healthy",
        detail={"reason": "line one\nline two", "step": seq},
    ))


def _reported(device_id: str, agent_version: str) -> bytes:
    return json.dumps({
        "device_id": device_id, "seq": 5, "sent_at": "2026-01-01T00:00:00Z",
        "agent_version": agent_version,
        "platform": {"system": "Linux", "release": "6", "machine": "x86_64", "python": "3.11"},
    }).encode()


def _with(payload: bytes, **fields) -> bytes:
    return json.dumps({**json.loads(payload), **fields}).encode()


def _deep_event(device_id: str, depth: int) -> bytes:
    """An event whose detail nests ``depth`` lists deep (1000: ~2 KB)."""
    return (b'{"device_id":"%s","seq":999999,"sent_at":"2026-01-01T00:00:00Z",'
            b'"event":"failed","detail":{"n":' % device_id.encode()
            + b"[" * depth + b"]" * depth + b"}}")


def _hostile(device_id: str, seq: int) -> list[tuple[str, bytes, str]]:
    """(topic, payload, reason) of each known class, aimed at a good device's topics."""
    telemetry, events = topic(device_id, "telemetry"), topic(device_id, "events")
    beat, event = _beat(device_id, seq), _event(device_id, seq)
    return [
        (events, _deep_event(device_id, 1000), "malformed_json"),
        (events, _deep_event(device_id, 6), "invalid"),
        (events, _with(event, detail={"note": "nul\x00here"}), "invalid"),
        (events, _with(event, detail={"note": "bell\x07"}), "invalid"),
        (telemetry, _with(beat, outbox_dropped={"a\x00": 1}), "invalid"),
        (telemetry, _with(beat, seq=str(seq)), "invalid"),
        (telemetry, _with(beat, seq=-1), "invalid"),
        (telemetry, _with(beat, seq=2**64), "invalid"),
        (telemetry, _with(beat, cpu_percent="high"), "invalid"),
        (telemetry, _with(beat, device_id=f"{device_id}\n"), "invalid"),
        (telemetry, b"x" * (MAX_MESSAGE_BYTES + 1), "oversized"),
        (telemetry, b"\xff\xfe" + beat, "malformed_json"),
        (telemetry, beat[:-7], "malformed_json"),
        (telemetry, _beat("dev-zz", seq), "wrong_device"),
        (events, b"9" * 5000, "malformed_json"),
    ]


# Always invalid, whatever is drawn: an unknown field, a control character in text, or a
# seq that is not a non-negative 64-bit integer.
_CONTROL = st.characters(codec="utf-8", max_codepoint=0x1F).filter(lambda c: c not in "\t\n\r")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)
_BAD_SEQ = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=2**63), st.text(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=3),
)
_MUTATION = st.one_of(
    st.tuples(st.just("extra"), st.text(min_size=1, max_size=12).filter(
        lambda k: k not in EventMessage.__struct_fields__), _JSON),
    st.tuples(st.just("control"), st.text(max_size=8), _CONTROL),
    st.tuples(st.just("seq"), st.just("seq"), _BAD_SEQ),
)


def _mutated(device_id: str, seq: int, mutation: tuple) -> bytes:
    kind, key, value = mutation
    data = json.loads(_event(device_id, seq))
    if kind == "extra":
        data[key] = value
    elif kind == "control":
        data["detail"]["note"] = f"{key}{value}"
    else:
        data["seq"] = value
    return json.dumps(data).encode()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _retained_on(broker_port: int, account: tuple[str, str], probe: str, marker: str) -> list:
    """Retained payloads on ``probe``: subscribe to it, then to ``marker`` (which holds a
    retained message): the broker sends retained messages in subscription order, so once
    the marker's arrives, the probe's would have arrived before it."""
    seen: list[tuple[str, bytes]] = []
    marker_seen = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id_for(account[0]),
                         protocol=paho.MQTTv5)
    client.username_pw_set(*account)

    def on_message(_client, _userdata, message) -> None:
        seen.append((message.topic, message.payload))
        if message.topic == marker:
            marker_seen.set()

    client.on_message = on_message
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        client.subscribe([(probe, 1), (marker, 1)])
        assert marker_seen.wait(15), "the marker's retained message never arrived"
    finally:
        client.disconnect()
        client.loop_stop()
    return [payload for name, payload in seen if name == probe]


def _generated_mutations(count: int) -> list[tuple]:
    """``count`` mutations drawn by Hypothesis (derandomized: the same list every run).
    Drawn outside the test, so the stream is sent once: the fleet under test is one
    process whose counters a second example would find already moved."""
    drawn: list[tuple] = []

    @settings(max_examples=1, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_MUTATION, min_size=count, max_size=count))
    def collect(mutations: list[tuple]) -> None:
        drawn[:] = mutations

    collect()
    return drawn


def test_a_hostile_stream_costs_only_itself(fleet_server, raw_mqtt, mosquitto):
    generated = _generated_mutations(GENERATED)
    fleet_pid = fleet_server.process.pid
    rss_before = _rss_mb(fleet_pid)
    expected_refusals: Counter[str] = Counter()

    def hostile(topic_name: str, payload: bytes, reason: str, retain: bool = False) -> None:
        raw_mqtt.publish(topic_name, payload, retain=retain)
        expected_refusals[reason] += 1

    # A retained poison on a good device's `reported`, before anything else.
    hostile(topic("dev-a", "reported"), _reported("dev-a", "1\x00x"), "invalid", retain=True)
    generated_iter = iter(generated)
    for seq in range(1, BEATS_PER_DEVICE + 1):
        for index, device_id in enumerate(GOOD_DEVICES):
            raw_mqtt.publish(topic(device_id, "telemetry"), _beat(device_id, seq))
            if seq <= EVENTS_PER_DEVICE:
                raw_mqtt.publish(topic(device_id, "events"), _event(device_id, seq))
            if seq % 10 == index:  # every class, against every device, a few times
                for case in _hostile(device_id, seq):
                    hostile(*case)
            mutation = next(generated_iter, None)
            if mutation is not None:
                hostile(topic(device_id, "events"), _mutated(device_id, seq, mutation),
                        "invalid")
        if seq % 8 == 0:  # replays: QoS 1 redelivery or a device sending its outbox again
            for device_id in GOOD_DEVICES:
                raw_mqtt.publish(topic(device_id, "telemetry"), _beat(device_id, seq))
                raw_mqtt.publish(topic(device_id, "events"), _event(device_id, min(seq, 3)))
    for index in range(FAKE_IDS):  # one device claiming thousands of others' ids
        fake = f"dev-fake-{index:05d}" if index % 2 else f"-bad id {index}"
        hostile(topic("dev-evil", "telemetry"),
                _beat("dev-evil", index + 1).replace(b'"dev-evil"', json.dumps(fake).encode()),
                "wrong_device" if index % 2 else "invalid")

    def refused() -> dict:
        return fleet_server.get("/api/v1/metrics").json()["ingest"]["rejected"]

    wait_until(lambda: sum(refused().values()) >= sum(expected_refusals.values()),
               timeout=90, what=f"{sum(expected_refusals.values())} refusals counted")
    for device_id in GOOD_DEVICES:
        beats = wait_until(
            lambda d=device_id: len(rows := fleet_server.get(
                f"/api/v1/devices/{d}/telemetry?limit=10000").json()) >= BEATS_PER_DEVICE
            and rows,
            timeout=60, what=f"{device_id}'s heartbeats",
        )
        assert sorted(row["seq"] for row in beats) == list(range(1, BEATS_PER_DEVICE + 1))
        assert all(row["client_error_count"] == 1 for row in beats)
        events = fleet_server.get(f"/api/v1/devices/{device_id}/events?limit=1000").json()
        assert sorted(row["seq"] for row in events) == list(range(1, EVENTS_PER_DEVICE + 1))
        assert events[0]["detail"]["reason"] == "line one\nline two"
    assert refused() == dict(expected_refusals)
    assert fleet_server.device("dev-zz") is None, "a forged id was registered"
    devices = {row["id"] for row in fleet_server.get("/api/v1/devices").json()}
    assert devices == set(GOOD_DEVICES), f"only the good devices exist, not {devices}"

    # The retained poison is gone from the broker: a restarted fleet will not see it again.
    raw_mqtt.publish(topic("dev-b", "reported"), _reported("dev-b", "2.0"), retain=True)
    probe = fleet_account("probe")  # the running fleet's own account is bound to it
    mosquitto.url_for(probe)
    assert _retained_on(mosquitto.port, (probe, mosquitto.passwords[probe]),
                        topic("dev-a", "reported"), topic("dev-b", "reported")) == []
    assert fleet_server.get("/api/v1/metrics").json()["ingest"]["retained_cleared"] >= 1

    growth = _rss_mb(fleet_pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB, f"the fleet grew by {growth:.0f} MB"
    assert fleet_server.process.poll() is None
