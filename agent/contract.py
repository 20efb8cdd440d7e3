"""The wire contract between agents and the fleet: topics, message models, size bounds.

Everything that crosses MQTT is defined here and nowhere else, so the agent and the fleet
cannot drift apart. The fleet imports this module; the agent never imports the fleet.

Invariants every device message keeps:

* it names its ``device_id``, which must equal the id in its topic (a device speaks only
  for itself; the broker ACL enforces it, ingest re-checks it);
* it carries a per-device ``seq`` that only grows, so the fleet can drop QoS 1 redeliveries
  and replays without a second row;
* it fits in :data:`MAX_MESSAGE_BYTES` and validates against its model, or it is refused
  with a :class:`MessageRejected` whose ``reason`` is a short stable code for metrics.

Status messages are ordered by ``connection`` (the seq the agent reserved for the Last Will
of that connection), not by arrival: within one connection a device only goes
online -> offline, and a newer connection always wins. That keeps a late Last Will from an
old connection from marking a reconnected device offline.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

__all__ = [
    "DEVICE_CHANNELS",
    "DEVICE_ID_PATTERN",
    "MANIFEST_NAME",
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "ActiveModel",
    "Baseline",
    "BaselineHistogram",
    "BundleManifest",
    "BundleRef",
    "Channel",
    "DesiredState",
    "DeviceId",
    "DriftMessage",
    "EventMessage",
    "FileEntry",
    "HealthCheckSpec",
    "HeartbeatTelemetry",
    "MessageRejected",
    "PlatformInfo",
    "ReportedState",
    "SignatureEntry",
    "SignedDesiredState",
    "StatusMessage",
    "TensorSchema",
    "decode_desired",
    "decode_device_message",
    "encode",
    "is_valid_device_id",
    "parse_topic",
    "topic",
    "utcnow",
]

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1/devices"
# Large enough for a reported state or a drift sketch of a few hundred bins, small enough
# that one hostile device cannot make the fleet parse megabytes per message.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DRIFT_FEATURES = 256
MAX_HISTOGRAM_BINS = 512
MAX_EVENT_DETAIL_KEYS = 32

# MQTT-safe: no '/', '+', '#', no leading '$', no whitespace; also a safe file name.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# Versions fit a 32-bit signed INTEGER column; generations, seqs and counters a BIGINT.
Version = Annotated[int, Field(ge=0, lt=2**31)]
Int64 = Annotated[int, Field(ge=0, lt=2**63)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Channel(StrEnum):
    """The last segment of a device topic; direction is fixed per channel."""

    DESIRED = "desired"  # fleet -> device, retained
    REPORTED = "reported"  # device -> fleet, retained
    STATUS = "status"  # device -> fleet, retained, also the Last Will
    TELEMETRY = "telemetry"  # device -> fleet
    EVENTS = "events"  # device -> fleet
    DRIFT = "drift"  # device -> fleet


_CHANNELS = {channel.value: channel for channel in Channel}
DEVICE_CHANNELS = frozenset(
    {Channel.REPORTED, Channel.STATUS, Channel.TELEMETRY, Channel.EVENTS, Channel.DRIFT}
)


class MessageRejected(ValueError):
    """A message that must not be applied; ``reason`` is a stable code for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_valid_device_id(value: str) -> bool:
    return re.fullmatch(DEVICE_ID_PATTERN, value) is not None


def utcnow() -> datetime:
    return datetime.now(UTC)


def topic(device_id: str, channel: Channel | str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{Channel(channel).value}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """Split a device topic into (device_id, channel); refuse anything else."""
    prefix = TOPIC_ROOT + "/"
    if not name.startswith(prefix):
        raise MessageRejected("unknown_topic", f"topic {name!r} is not under {TOPIC_ROOT}/")
    parts = name[len(prefix) :].split("/")
    if len(parts) != 2:
        raise MessageRejected("unknown_topic", f"topic {name!r} is not {TOPIC_ROOT}/ID/CHANNEL")
    device_id, channel = parts
    try:
        return device_id, _CHANNELS[channel]  # not Channel(channel): the Enum call is slow
    except KeyError:
        raise MessageRejected("unknown_topic", f"unknown channel {channel!r}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceMessage(_Strict):
    """Fields every device -> fleet message carries."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    sent_at: datetime


class StatusMessage(DeviceMessage):
    kind: Literal["status"] = "status"
    state: Literal["online", "offline"]
    connection: Annotated[int, Field(ge=0, lt=2**63)]


class ActiveModel(_Strict):
    name: ShortText
    version: Version


class BundleRef(_Strict):
    """Which bundle a device should run."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    version: Version

    @property
    def target_name(self) -> str:
        return f"{self.name}-{self.version}.bundle"


class PlatformInfo(_Strict):
    system: ShortText
    release: ShortText
    machine: ShortText
    python: ShortText
    runtimes: Annotated[dict[ShortText, ShortText], Field(max_length=16)] = {}


class ReportedState(DeviceMessage):
    kind: Literal["reported"] = "reported"
    agent_version: ShortText
    active_model: ActiveModel | None = None
    platform: PlatformInfo
    desired_generation: Int64 | None = None
    desired_bundle: BundleRef | None = None


class HeartbeatTelemetry(DeviceMessage):
    kind: Literal["heartbeat"] = "heartbeat"
    uptime_s: NonNegative
    cpu_percent: NonNegative
    rss_mb: NonNegative
    inference_count: Int64
    error_count: Int64
    latency_ms_p50: NonNegative | None = None
    latency_ms_p95: NonNegative | None = None
    # The durable outbox: messages waiting for the broker, and drops by priority so far.
    outbox_depth: Int64 | None = None
    outbox_dropped: Annotated[dict[ShortText, Int64], Field(max_length=8)] | None = None


class EventMessage(DeviceMessage):
    kind: Literal["event"] = "event"
    event: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    detail: Annotated[dict[ShortText, Any], Field(max_length=MAX_EVENT_DETAIL_KEYS)] = {}


class FeatureHistogram(_Strict):
    feature: ShortText
    counts: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_HISTOGRAM_BINS)]


class DriftMessage(DeviceMessage):
    kind: Literal["drift"] = "drift"
    model: ActiveModel
    features: Annotated[list[FeatureHistogram], Field(max_length=MAX_DRIFT_FEATURES)]


class DesiredState(_Strict):
    """Fleet -> device: what the device should run. ``generation`` only grows per device."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device_id: DeviceId
    generation: Annotated[int, Field(ge=1, lt=2**63)]
    bundle: BundleRef | None
    issued_at: datetime


class SignatureEntry(_Strict):
    keyid: Sha256Hex
    sig: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,1024}$")]


class SignedDesiredState(_Strict):
    """What travels on ``desired``: the state plus director signatures over the canonical
    JSON of ``signed`` exactly as received (see ``agent.trust.desired``)."""

    signed: DesiredState
    signatures: Annotated[list[SignatureEntry], Field(min_length=1, max_length=8)]


# ---------------------------------------------------------------------------------------
# Bundle manifest: the first member of every bundle archive, ``manifest.json``.
# ---------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
MAX_BUNDLE_FILES = 16
MAX_TENSORS = 64
MAX_FEATURES = 4096
BundleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
# A bundle member is a plain file name: no directories, no '..', nothing absolute.
MemberName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]


class TensorSchema(_Strict):
    name: ShortText
    dtype: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{2,16}$")]
    shape: Annotated[list[Annotated[int, Field(ge=0)] | None], Field(max_length=8)]
    allow_nan: bool = False  # inputs: requests with NaN are refused unless this is set


class FileEntry(_Strict):
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0)]


class HealthCheckSpec(_Strict):
    """Samples with the outputs the model gave at build time; the device must reproduce them."""

    file: MemberName
    rtol: Annotated[float, Field(ge=0, le=1)] = 1e-4
    atol: Annotated[float, Field(ge=0, le=1)] = 1e-5


class BaselineHistogram(_Strict):
    """Training distribution of one feature: ``len(edges) == len(counts) + 1``."""

    feature: ShortText
    edges: Annotated[list[float], Field(min_length=2, max_length=MAX_HISTOGRAM_BINS + 1)]
    counts: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_HISTOGRAM_BINS)]


class Baseline(_Strict):
    rows: Annotated[int, Field(ge=0)]
    features: Annotated[list[BaselineHistogram], Field(max_length=MAX_FEATURES)]


class BundleManifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: BundleName
    version: Version
    runtime: Literal["onnx", "tflite"]
    model_file: MemberName
    inputs: Annotated[list[TensorSchema], Field(min_length=1, max_length=MAX_TENSORS)]
    outputs: Annotated[list[TensorSchema], Field(min_length=1, max_length=MAX_TENSORS)]
    files: Annotated[dict[MemberName, FileEntry], Field(min_length=1, max_length=MAX_BUNDLE_FILES)]
    health_check: HealthCheckSpec | None = None
    baseline_file: MemberName | None = None
    created: datetime

    @property
    def ref(self) -> BundleRef:
        return BundleRef(name=self.name, version=self.version)

    @property
    def target_name(self) -> str:
        """The bundle's file name in the repository (a TUF target path)."""
        return f"{self.name}-{self.version}.bundle"


_MODEL_FOR_CHANNEL: dict[Channel, type[DeviceMessage]] = {
    Channel.STATUS: StatusMessage,
    Channel.REPORTED: ReportedState,
    Channel.TELEMETRY: HeartbeatTelemetry,
    Channel.EVENTS: EventMessage,
    Channel.DRIFT: DriftMessage,
}

DeviceMessageT = StatusMessage | ReportedState | HeartbeatTelemetry | EventMessage | DriftMessage


def encode(message: BaseModel) -> bytes:
    data = message.model_dump_json().encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageRejected(
            "oversized", f"{len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound"
        )
    return data


def _load_json(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageRejected(
            "oversized", f"{len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound"
        )
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageRejected("malformed_json", str(exc)) from None
    except RecursionError:  # e.g. 60 000 nested '[': small, but deeper than Python goes
        raise MessageRejected("malformed_json", "JSON nested too deeply") from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field {where!r}: {first['msg']}{more}"


def decode_device_message(topic_name: str, payload: bytes) -> DeviceMessageT:
    """Validate a device -> fleet message against its topic, or raise MessageRejected."""
    device_id, channel = parse_topic(topic_name)
    if channel not in _MODEL_FOR_CHANNEL:
        raise MessageRejected("wrong_direction", f"devices do not publish on {channel.value!r}")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageRejected(
            "oversized", f"{len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound"
        )
    try:  # pydantic parses the JSON itself: one pass, no intermediate dicts (the hot path)
        message = _MODEL_FOR_CHANNEL[channel].model_validate_json(payload)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise MessageRejected("malformed_json", exc.errors()[0]["msg"]) from None
        raise MessageRejected("invalid", _describe(exc)) from None
    if message.device_id != device_id:
        raise MessageRejected(
            "wrong_device",
            f"message says device_id={message.device_id!r} on the topic of {device_id!r}",
        )
    return message  # type: ignore[return-value]


def decode_desired(device_id: str, payload: bytes) -> tuple[SignedDesiredState, dict]:
    """Validate a signed desired state addressed to ``device_id``, or raise MessageRejected.

    Returns the model and the raw ``signed`` object, over which signatures are checked.
    Signatures themselves are checked by ``agent.trust.desired`` (it needs the keys).
    """
    data = _load_json(payload)
    if isinstance(data, dict) and "signatures" not in data and "generation" in data:
        raise MessageRejected("unsigned", "desired state carries no signatures")
    try:
        envelope = SignedDesiredState.model_validate(data)
    except ValidationError as exc:
        raise MessageRejected("invalid", _describe(exc)) from None
    if envelope.signed.device_id != device_id:
        raise MessageRejected(
            "wrong_device",
            f"desired state for {envelope.signed.device_id!r} sent to {device_id!r}",
        )
    return envelope, data["signed"]
