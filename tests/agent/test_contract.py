"""The wire contract refuses what it must, with a reason code and a message naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract import (
    MAX_MESSAGE_BYTES,
    BaselineHistogram,
    Channel,
    DesiredState,
    EventMessage,
    HeartbeatTelemetry,
    MessageRejected,
    ReportedState,
    SignatureEntry,
    SignedDesiredState,
    StatusMessage,
    convert,
    decode,
    decode_desired,
    decode_device_message,
    encode,
    fit_detail,
    parse_topic,
    topic,
    utcnow,
    validated,
)


def _status(device_id: str = "dev-1", **overrides) -> StatusMessage:
    fields = dict(device_id=device_id, seq=3, sent_at=utcnow(), state="online", connection=2)
    return StatusMessage(**{**fields, **overrides})


def test_topic_round_trip():
    name = topic("dev-1", Channel.TELEMETRY)
    assert name == "edgefleet/v1/devices/dev-1/telemetry"
    assert parse_topic(name) == ("dev-1", Channel.TELEMETRY)


@pytest.mark.parametrize(
    "name",
    ["other/v1/devices/a/status", "edgefleet/v1/devices/a/b/status", "edgefleet/v1/devices/a/x"],
)
def test_foreign_topics_are_refused(name):
    with pytest.raises(MessageRejected) as caught:
        parse_topic(name)
    assert caught.value.reason == "unknown_topic"


def test_valid_message_decodes_to_its_model():
    message = decode_device_message(topic("dev-1", "status"), encode(_status()))
    assert isinstance(message, StatusMessage) and message.connection == 2


def test_oversized_payload_is_refused_before_parsing():
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "status"), b" " * (MAX_MESSAGE_BYTES + 1))
    assert caught.value.reason == "oversized"
    assert str(MAX_MESSAGE_BYTES) in caught.value.detail


def test_encoding_refuses_to_produce_an_oversized_message():
    event = EventMessage(
        device_id="d", seq=1, sent_at=utcnow(), event="big",
        detail={f"blob{i}": "x" * 4000 for i in range(20)},
    )
    with pytest.raises(MessageRejected, match="oversized"):
        encode(event)


@pytest.mark.parametrize("payload", [b"{", b"\xff\xfe", b"[1, 2", b"{\"seq\": 1,"])
def test_malformed_json_is_refused(payload):
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "status"), payload)
    assert caught.value.reason == "malformed_json"


def test_invalid_field_is_named_in_the_reason():
    data = json.loads(encode(_status()))
    data["seq"] = -1
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "status"), json.dumps(data).encode())
    assert caught.value.reason == "invalid"
    assert "'seq'" in caught.value.detail


def test_unknown_fields_and_schema_versions_are_refused():
    data = json.loads(encode(_status()))
    with pytest.raises(MessageRejected, match="'extra'"):
        decode_device_message(topic("dev-1", "status"), json.dumps({**data, "extra": 1}).encode())
    with pytest.raises(MessageRejected, match="'schema_version'"):
        decode_device_message(
            topic("dev-1", "status"), json.dumps({**data, "schema_version": 2}).encode()
        )


def test_message_for_another_device_is_refused():
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "status"), encode(_status("dev-2")))
    assert caught.value.reason == "wrong_device"
    assert "dev-2" in caught.value.detail and "dev-1" in caught.value.detail


def test_devices_cannot_publish_desired_state():
    desired = DesiredState(device_id="dev-1", generation=1, bundle=None, issued_at=utcnow())
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "desired"), encode(desired))
    assert caught.value.reason == "wrong_direction"


def _heartbeat(device_id: str = "dev-1", **overrides) -> HeartbeatTelemetry:
    fields = dict(device_id=device_id, seq=1, sent_at=utcnow(), uptime_s=0, cpu_percent=0,
                  rss_mb=0, inference_count=0, error_count=0)
    return HeartbeatTelemetry(**{**fields, **overrides})


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "$SYS", "a b", "x" * 65])
def test_unsafe_device_ids_are_refused_on_both_sides(device_id):
    with pytest.raises(MessageRejected) as sending:  # the agent will not send it
        encode(_heartbeat(device_id))
    assert sending.value.reason == "invalid" and "'device_id'" in sending.value.detail
    raw = json.dumps({**json.loads(encode(_heartbeat())), "device_id": device_id}).encode()
    with pytest.raises(MessageRejected) as receiving:  # nor the fleet accept it
        decode(HeartbeatTelemetry, raw)
    assert receiving.value.reason == "invalid" and "'device_id'" in receiving.value.detail


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("rss_mb", 1e999, "'rss_mb'"),  # infinity: JSON cannot say it, a big number can
        ("cpu_percent", -1, "'cpu_percent'"),
        ("seq", 2**63, "'seq'"),  # does not fit the BIGINT column
        ("sent_at", "2026-11-23T10:00:00", "'sent_at'"),  # no zone: ambiguous
        ("inference_count", True, "'inference_count'"),  # a bool is not a count
        ("outbox_dropped", {"k": -1}, "'outbox_dropped[...]'"),
    ],
)
def test_out_of_range_values_are_refused_by_field(field, value, named):
    data = json.loads(encode(_heartbeat()))
    data[field] = value
    payload = json.dumps(data).encode().replace(b"Infinity", b"1e999")
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("dev-1", "telemetry"), payload)
    assert caught.value.reason == "invalid"
    assert named in caught.value.detail


def test_unknown_nested_field_is_named_with_its_parent():
    platform = {"system": "Linux", "release": "6", "machine": "x", "python": "3.11"}
    reported = {"device_id": "dev-1", "seq": 1, "sent_at": "2026-11-23T10:00:00Z",
                "agent_version": "1", "platform": platform}
    assert convert(ReportedState, reported).platform.machine == "x"
    with pytest.raises(MessageRejected, match=r"'platform\.extra'"):
        convert(ReportedState, {**reported, "platform": {**platform, "extra": 1}})


def test_baseline_histogram_needs_one_more_edge_than_counts():
    good = {"feature": "x[0]", "edges": [0.0, 1.0, 2.0], "counts": [3, 4]}
    assert convert(BaselineHistogram, good).counts == [3, 4]
    with pytest.raises(MessageRejected, match="3 edges for 3 counts"):
        convert(BaselineHistogram, {**good, "counts": [1, 2, 3]})


def test_structs_built_in_code_are_checked_by_validated():
    message = _heartbeat(rss_mb=12)
    checked = validated(message)
    assert checked == message and isinstance(checked.rss_mb, float)
    with pytest.raises(MessageRejected, match="'seq'"):
        validated(_heartbeat(seq=-5))


def _signed(desired: DesiredState) -> bytes:
    return encode(
        SignedDesiredState(signed=desired, signatures=[SignatureEntry(keyid="a" * 64, sig="00")])
    )


def test_desired_state_for_another_device_is_refused():
    desired = DesiredState(device_id="dev-2", generation=1, bundle=None, issued_at=utcnow())
    with pytest.raises(MessageRejected) as caught:
        decode_desired("dev-1", _signed(desired))
    assert caught.value.reason == "wrong_device"


def test_unsigned_desired_state_is_refused_by_name():
    desired = DesiredState(device_id="dev-1", generation=1, bundle=None, issued_at=utcnow())
    with pytest.raises(MessageRejected) as caught:
        decode_desired("dev-1", encode(desired))
    assert caught.value.reason == "unsigned"
    envelope, raw = decode_desired("dev-1", _signed(desired))
    assert envelope.signed == desired and raw["generation"] == 1


# --- hostile text and free JSON -------------------------------------------------------

_EVENT_HEAD = (b'{"device_id":"d1","seq":1,"sent_at":"2026-01-01T00:00:00Z",'
               b'"event":"failed","detail":{"n":')


@pytest.mark.parametrize(("payload", "reason"), [
    (_EVENT_HEAD + b"[" * 1000 + b"]" * 1000 + b"}}", "malformed_json"),  # parser's stack
    (_EVENT_HEAD + b"[" * 5 + b"]" * 5 + b"}}", "invalid"),  # deeper than the bound
    (_EVENT_HEAD + b'"nul\\u0000"}}', "invalid"),
    (_EVENT_HEAD + b'"esc\\u001b[31m"}}', "invalid"),
    (_EVENT_HEAD + b'"' + b"x" * 5000 + b'"}}', "invalid"),
    (_EVENT_HEAD + b"[" + b"0," * 100 + b"0]}}", "invalid"),  # wider than the bound
    (_EVENT_HEAD + b'"\\ud800"}}', "malformed_json"),  # a lone surrogate
])
def test_free_json_is_bounded_in_depth_width_and_text(payload, reason):
    with pytest.raises(MessageRejected) as caught:
        decode_device_message(topic("d1", "events"), payload)
    assert caught.value.reason == reason


def test_multi_line_text_in_an_event_detail_is_kept():
    message = decode_device_message(topic("d1", "events"), _EVENT_HEAD + b'"a\\nb\\tc"}}')
    assert message.detail == {"n": "a\nb\tc"}


@pytest.mark.parametrize("text", ["1\x00x", "1\nx", "bell\x07", "del\x7f", "x\n"])
def test_control_characters_in_text_fields_are_refused(text):
    payload = json.dumps({
        "device_id": "d1", "seq": 1, "sent_at": "2026-01-01T00:00:00Z", "agent_version": text,
        "platform": {"system": "L", "release": "1", "machine": "x", "python": "3"},
    }).encode()
    with pytest.raises(MessageRejected, match="agent_version"):
        decode_device_message(topic("d1", "reported"), payload)


def test_an_id_with_a_trailing_newline_is_not_an_id():
    """Python's ``$`` matches before a final newline; the contract's patterns must not."""
    payload = json.dumps({"device_id": "d1\n", "seq": 1, "sent_at": "2026-01-01T00:00:00Z",
                          "state": "online", "connection": 1}).encode()
    with pytest.raises(MessageRejected, match="device_id"):
        decode_device_message(topic("d1\n", "status"), payload)


_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(), inner, max_size=8),
    max_leaves=40,
)


_WIDE = st.lists(st.integers(), min_size=65, max_size=80)  # over the width bound
_DEEP = st.recursive(st.text(), lambda inner: st.lists(inner, min_size=1, max_size=2),
                     max_leaves=8)


@settings(max_examples=100, deadline=None)
@given(detail=st.dictionaries(st.text(max_size=300), _ANY_JSON | _WIDE | _DEEP, max_size=40))
def test_an_agents_own_event_detail_always_fits_the_contract(detail):
    """Whatever a device puts in an event (a runtime's error text can hold any character),
    the event it sends is one the fleet accepts: ``fit_detail`` makes it so."""
    event = EventMessage(device_id="d1", seq=1, sent_at=utcnow(), event="failed",
                         detail=fit_detail(detail))
    try:
        payload = encode(event)
    except MessageRejected as exc:  # only ever too big as a whole
        assert exc.reason == "oversized"
        return
    assert decode_device_message(topic("d1", "events"), payload).detail == event.detail


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512) | st.builds(
    lambda data: json.dumps(data).encode(), _ANY_JSON))
def test_any_bytes_are_either_a_message_or_a_named_refusal(payload):
    for channel in ("status", "reported", "telemetry", "events", "drift"):
        try:
            decode_device_message(topic("d1", channel), payload)
        except MessageRejected as exc:
            assert exc.reason in {"malformed_json", "invalid", "oversized", "wrong_device"}
