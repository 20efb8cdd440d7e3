"""The wire contract between agents and the fleet: topics, message models, size bounds.

Everything that crosses MQTT is defined here and nowhere else, so the agent and the fleet
cannot drift apart. The fleet imports this module; the agent never imports the fleet.

Invariants every device message keeps:

* it names its ``device_id``, which must equal the id in its topic (a device speaks only
  for itself; the broker ACL enforces it, ingest re-checks it);
* it carries a per-device ``seq`` that only grows, so the fleet can drop QoS 1 redeliveries
  and replays without a second row;
* it may carry the ``incarnation`` of the device's state directory (a random id made with
  it): ``seq`` only grows within one incarnation, and a device whose state was wiped starts
  a new one, so the fleet can tell a restarted sequence from a replay. Optional: agents
  from before the field send none, and the fleet judges their messages by ``seq`` alone;
* it fits in :data:`MAX_MESSAGE_BYTES` and validates against its model, or it is refused
  with a :class:`MessageRejected` whose ``reason`` is a short stable code for metrics.

Status messages are ordered by ``connection`` (the seq the agent reserved for the Last Will
of that connection), not by arrival: within one connection a device only goes
online -> offline, and a newer connection always wins. That keeps a late Last Will from an
old connection from marking a reconnected device offline.

The models are msgspec Structs, not pydantic models: the same declarative types and
constraints, validated while the JSON is parsed, at about a tenth of pydantic's memory on
the device (pydantic took ~10 MB of the agent's ~80 MB idle footprint) and several times
faster on the fleet's ingest path. Construction in code does not validate; every boundary
does (:func:`decode`, :func:`convert`, :func:`encode`, :func:`validated`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

__all__ = [
    "DEVICE_CHANNELS",
    "DEVICE_ID_PATTERN",
    "DIRECTOR_FIELD",
    "HISTOGRAM_EXTRA_BINS",
    "HISTOGRAM_MISSING",
    "HISTOGRAM_OVERFLOW",
    "HISTOGRAM_UNDERFLOW",
    "INCARNATION_PATTERN",
    "LABEL_KEY_PATTERN",
    "LABEL_VALUE_PATTERN",
    "MANIFEST_NAME",
    "MAX_BASELINE_BINS",
    "MAX_BASELINE_BYTES",
    "MAX_DRIFT_FEATURES",
    "MAX_HISTOGRAM_BINS",
    "MAX_LABELS",
    "MAX_MANIFEST_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_SAMPLES_BYTES",
    "SAMPLE_EXPECTED_PREFIX",
    "SAMPLE_INPUT_PREFIX",
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
    "DriftThresholdSpec",
    "EventMessage",
    "FeatureHistogram",
    "FileEntry",
    "HealthCheckSpec",
    "HeartbeatTelemetry",
    "MessageRejected",
    "ModelMetadata",
    "PlatformInfo",
    "ReportedState",
    "SignatureEntry",
    "SignedDesiredState",
    "StatusMessage",
    "SummaryKind",
    "SummarySpec",
    "TensorSchema",
    "check_free_json",
    "convert",
    "decode",
    "decode_desired",
    "decode_device_message",
    "encode",
    "fit_detail",
    "is_valid_device_id",
    "manifest_bytes",
    "parse_topic",
    "signed_bytes",
    "to_data",
    "to_json",
    "topic",
    "utcnow",
    "validated",
]

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1/devices"
# Large enough for a reported state or a drift sketch of a few hundred bins, small enough
# that one hostile device cannot make the fleet parse megabytes per message.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DRIFT_FEATURES = 256
MAX_HISTOGRAM_BINS = 512
# A live histogram (FeatureHistogram.counts) holds, for a baseline feature with edges
# e_0 < ... < e_k (k inner bins), k + 3 counts:
#   [underflow: x < e_0] + k inner bins + [overflow: x > e_k] + [missing: NaN, +-inf, absent]
# binned as i = searchsorted(edges, x, side="right") (np.histogram's bins inside: the
# last inner bin includes e_k). A baseline therefore has at most MAX_HISTOGRAM_BINS - 3
# inner bins, so its live histogram still fits a message.
HISTOGRAM_EXTRA_BINS = 3
HISTOGRAM_UNDERFLOW = 0
HISTOGRAM_OVERFLOW = -2
HISTOGRAM_MISSING = -1
MAX_BASELINE_BINS = MAX_HISTOGRAM_BINS - HISTOGRAM_EXTRA_BINS
MAX_EVENT_DETAIL_KEYS = 32
# Free JSON (an event's ``detail``) is bounded in depth, width and text as well as in bytes:
# a few kilobytes of '[' are enough to exhaust a parser's stack.
MAX_DETAIL_DEPTH = 4
MAX_DETAIL_ITEMS = 64
MAX_DETAIL_TEXT = 4096

# Patterns end in ``\Z``, not ``$``: msgspec matches with Python's ``re.search``, where
# ``$`` also matches before a final newline ("dev-a\n" would pass as "dev-a").
# MQTT-safe: no '/', '+', '#', no leading '$', no whitespace; also a safe file name.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
DeviceId = Annotated[str, Meta(pattern=DEVICE_ID_PATTERN)]
# Text from a device is printable: no control characters (PostgreSQL refuses a NUL in
# text, and the others only hide things in logs and terminals) and no lone surrogates
# (JSON can spell them, UTF-8 cannot store them).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f\ud800-\udfff]*\Z"
ShortText = Annotated[str, Meta(max_length=256, pattern=TEXT_PATTERN)]
# Finite: JSON has no NaN, and a number like 1e999 (infinity) fails the upper bound.
NonNegative = Annotated[float, Meta(ge=0, le=1.7976931348623157e308)]
# Versions fit a 32-bit signed INTEGER column; generations, seqs and counters a BIGINT.
Version = Annotated[int, Meta(ge=0, lt=2**31)]
Int64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, Meta(ge=0)]
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
BundleName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")]
# Timestamps carry their zone: a naive time from a device is ambiguous, so it is refused.
Timestamp = Annotated[datetime, Meta(tz=True)]
# The random id of a device's state directory (agent.state makes 16 hex digits).
INCARNATION_PATTERN = r"^[A-Za-z0-9_-]{8,64}\Z"
Incarnation = Annotated[str, Meta(pattern=INCARNATION_PATTERN)]


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


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Immutable, unknown fields refused. Structs are plain data: constraints are checked
    where bytes cross a boundary (:func:`decode`, :func:`encode`, :func:`validated`)."""


class DeviceMessage(_Strict, kw_only=True):
    """Fields every device -> fleet message carries."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device_id: DeviceId
    seq: Int64
    sent_at: Timestamp
    # The sequence ``seq`` belongs to: new when the state directory is made (re-flash, new
    # SD card), kept across restarts. None from agents that predate the field.
    incarnation: Incarnation | None = None


class StatusMessage(DeviceMessage, kw_only=True):
    kind: Literal["status"] = "status"
    state: Literal["online", "offline"]
    connection: Int64


class ActiveModel(_Strict, kw_only=True):
    name: ShortText
    version: Version


class BundleRef(_Strict, kw_only=True):
    """Which bundle a device should run."""

    name: BundleName
    version: Version

    @property
    def target_name(self) -> str:
        return f"{self.name}-{self.version}.bundle"


class PlatformInfo(_Strict, kw_only=True):
    system: ShortText
    release: ShortText
    machine: ShortText
    python: ShortText
    runtimes: Annotated[dict[ShortText, ShortText], Meta(max_length=16)] = {}


# Labels a device reports from its own configuration (`edge-agent run --label site=berlin`)
# and tags an operator sets share one shape, so a rollout selector reads both alike.
LABEL_KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}\Z"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}\Z"
MAX_LABELS = 32
LabelKey = Annotated[str, Meta(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Meta(pattern=LABEL_VALUE_PATTERN)]


class ReportedState(DeviceMessage, kw_only=True):
    kind: Literal["reported"] = "reported"
    agent_version: ShortText
    active_model: ActiveModel | None = None
    platform: PlatformInfo
    desired_generation: Int64 | None = None
    desired_bundle: BundleRef | None = None
    labels: Annotated[dict[LabelKey, LabelValue], Meta(max_length=MAX_LABELS)] = {}


class HeartbeatTelemetry(DeviceMessage, kw_only=True):
    kind: Literal["heartbeat"] = "heartbeat"
    uptime_s: NonNegative
    cpu_percent: NonNegative
    rss_mb: NonNegative
    inference_count: Int64
    # Model/runtime failures on valid requests; requests refused as the caller's mistake
    # (4xx on the local endpoint) are counted apart, so they never look like a bad model.
    error_count: Int64
    client_error_count: Int64 = 0
    latency_ms_p50: NonNegative | None = None
    latency_ms_p95: NonNegative | None = None
    # The durable outbox: messages waiting for the broker, and drops by priority so far.
    outbox_depth: Int64 | None = None
    outbox_dropped: Annotated[dict[ShortText, Int64], Meta(max_length=8)] | None = None


class EventMessage(DeviceMessage, kw_only=True):
    kind: Literal["event"] = "event"
    event: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.]{0,63}\Z")]
    detail: Annotated[dict[ShortText, Any], Meta(max_length=MAX_EVENT_DETAIL_KEYS)] = {}

    def __post_init__(self) -> None:
        check_free_json(self.detail, "detail")


# Multi-line text is fine in free JSON (an error message from a runtime); other control
# characters and lone surrogates are not.
_FREE_TEXT_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def fit_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """A copy of an event's detail that :func:`check_free_json` accepts: text cut to its
    bound with control characters replaced, anything nested too deep turned into text.

    For the device's own events: an error message from a runtime can be long or hold any
    byte, and an event must still be sent (its reason matters more than its detail)."""

    def fit(value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return _FREE_TEXT_FORBIDDEN.sub("\ufffd", value[:MAX_DETAIL_TEXT])
        if isinstance(value, dict | list | tuple):
            if depth >= MAX_DETAIL_DEPTH - 1:
                return fit(repr(value), depth)
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            fitted = [(k, fit(v, depth + 1)) for k, v in items[:MAX_DETAIL_ITEMS]]
            if isinstance(value, dict):
                return {fit_key(k): v for k, v in fitted}
            return [v for _, v in fitted]
        return value

    def fit_key(key: Any) -> str:
        return re.sub(r"[\x00-\x1f\x7f\ud800-\udfff]", "\ufffd", str(key))[:256]

    return {fit_key(k): fit(v, 1) for k, v in list(detail.items())[:MAX_EVENT_DETAIL_KEYS]}


def check_free_json(value: Any, where: str) -> None:
    """Refuse free JSON deeper than :data:`MAX_DETAIL_DEPTH`, containers wider than
    :data:`MAX_DETAIL_ITEMS`, or text that is long or holds control characters.

    Iterative, and it stops at the first level too deep, so a value nested as deep as the
    parser allowed costs a few steps, not a recursion as deep as the value."""
    pending: list[tuple[Any, str, int]] = [(value, where, 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, str):
            if len(item) > MAX_DETAIL_TEXT:
                raise ValueError(f"{path}: text longer than {MAX_DETAIL_TEXT} characters")
            if _FREE_TEXT_FORBIDDEN.search(item):
                raise ValueError(f"{path}: text holds a control character")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth >= MAX_DETAIL_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_DETAIL_DEPTH} levels")
        if len(item) > MAX_DETAIL_ITEMS:
            raise ValueError(f"{path}: more than {MAX_DETAIL_ITEMS} items")
        if isinstance(item, dict):
            for key, child in item.items():
                pending.append((key, f"{path} key", depth + 1))
                pending.append((child, f"{path}.{key}", depth + 1))
        else:
            pending.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


class FeatureHistogram(_Strict, kw_only=True):
    """One feature's live window, in the k + 3 layout over its baseline's edges (see
    :data:`HISTOGRAM_EXTRA_BINS`): underflow, the k inner bins, overflow, missing."""

    feature: ShortText
    counts: Annotated[list[Count], Meta(max_length=MAX_HISTOGRAM_BINS)]


class DriftMessage(DeviceMessage, kw_only=True):
    """A closed drift window of one bundle. A window too large for one message is sent as
    several, each with some of its features and the same ``window_started_at``."""

    kind: Literal["drift"] = "drift"
    model: ActiveModel
    features: Annotated[list[FeatureHistogram], Meta(max_length=MAX_DRIFT_FEATURES)]
    # Rows the device served in the window; the counts cover all of them or, under load,
    # an even sample (so a feature's counts may sum to less).
    rows: Int64 | None = None
    window_started_at: Timestamp | None = None


class DesiredState(_Strict, kw_only=True):
    """Fleet -> device: what the device should run. ``generation`` only grows per device."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device_id: DeviceId
    generation: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    bundle: BundleRef | None
    issued_at: Timestamp


class SignatureEntry(_Strict, kw_only=True):
    keyid: Sha256Hex
    sig: Annotated[str, Meta(pattern=r"^[0-9a-f]{2,1024}\Z")]


class SignedDesiredState(_Strict, kw_only=True):
    """What travels on ``desired``: the state plus director signatures over the canonical
    JSON of ``signed`` exactly as received (see ``agent.trust.desired``)."""

    signed: DesiredState
    signatures: Annotated[list[SignatureEntry], Meta(min_length=1, max_length=8)]


# ---------------------------------------------------------------------------------------
# Bundle manifest: the first member of every bundle archive, ``manifest.json``.
# ---------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1024 * 1024
# ``samples.npz``: the health check's inputs and the outputs the model gave at build time,
# under these key prefixes followed by the tensor's name.
SAMPLE_INPUT_PREFIX = "input:"
SAMPLE_EXPECTED_PREFIX = "expected:"
MAX_BUNDLE_FILES = 16
MAX_TENSORS = 64
MAX_FEATURES = 4096
# What a device will inflate ``samples.npz`` to (the members' declared sizes, checked before
# anything is read): the build refuses samples over it rather than ship a bundle that fails.
MAX_SAMPLES_BYTES = 64 * 1024 * 1024
# The model file's own key/value metadata (ONNX ``metadata_props``: an OCR recogniser's
# character dictionary, a VAD's sample rates), served by ``GET /v1/model``. Bounded like any
# bundle text; the manifest as a whole stays under MAX_MANIFEST_BYTES.
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 256 * 1024
MetadataKey = Annotated[
    str, Meta(min_length=1, max_length=MAX_METADATA_KEY_CHARS, pattern=TEXT_PATTERN)
]
# Values may be multi-line (a dictionary, one entry per line): tab, LF and CR are allowed.
MetadataValue = Annotated[
    str,
    Meta(
        max_length=MAX_METADATA_VALUE_CHARS,
        pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]*\Z",
    ),
]
ModelMetadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=MAX_METADATA_KEYS)]
# A bundle member is a plain file name: no directories, no '..', nothing absolute.
MemberName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")]


class TensorSchema(_Strict, kw_only=True):
    name: ShortText
    dtype: Annotated[str, Meta(pattern=r"^[a-z0-9]{2,16}\Z")]
    shape: Annotated[list[Count | None], Meta(max_length=8)]
    allow_nan: bool = False  # inputs: requests with NaN are refused unless this is set


class FileEntry(_Strict, kw_only=True):
    sha256: Sha256Hex
    size: Count


class HealthCheckSpec(_Strict, kw_only=True):
    """Samples with the outputs the model gave at build time; the device must reproduce them."""

    file: MemberName
    rtol: Annotated[float, Meta(ge=0, le=1)] = 1e-4
    atol: Annotated[float, Meta(ge=0, le=1)] = 1e-5


# What baseline.json may weigh: 4096 features of 509 bins is ~40 MB of JSON, more than a
# device should parse; real baselines are a few kilobytes to a few hundred.
MAX_BASELINE_BYTES = 16 * 1024 * 1024
# Finite: JSON has no NaN or infinity, and edges must compare.
FiniteFloat = Annotated[float, Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]


class BaselineHistogram(_Strict, kw_only=True):
    """Training distribution of one feature: ``len(edges) == len(counts) + 1``, edges
    strictly increasing (the device bins live values on them)."""

    feature: ShortText
    edges: Annotated[list[FiniteFloat], Meta(min_length=2, max_length=MAX_BASELINE_BINS + 1)]
    counts: Annotated[list[Count], Meta(max_length=MAX_BASELINE_BINS)]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(
                f"{len(self.edges)} edges for {len(self.counts)} counts (needs counts + 1)"
            )
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")


SummaryKind = Literal["values", "image", "audio", "stats", "classes", "scores"]


class SummarySpec(_Strict, kw_only=True, omit_defaults=True):
    """How one model tensor is reduced to features per row, recorded at build so the device
    computes exactly what the build computed (``agent.drift.summaries`` names the features
    and computes them; the rules for choosing are there too).

    ``values``: every element of a row is a feature (``columns`` of them); ``image``:
    per-channel pixel statistics (``channels``, the channel dim at ``channel_axis``, or
    one channel when ``None``); ``audio``, ``stats``, ``scores``: fixed statistics of the
    row; ``classes``: the argmax over ``classes`` scores and the top score."""

    tensor: ShortText
    role: Literal["input", "output"]
    kind: SummaryKind
    columns: Annotated[int, Meta(ge=1, le=MAX_FEATURES)] | None = None
    channels: Annotated[int, Meta(ge=1, le=64)] | None = None
    channel_axis: Annotated[int, Meta(ge=1, le=7)] | None = None
    classes: Annotated[int, Meta(ge=2, le=MAX_BASELINE_BINS)] | None = None

    def __post_init__(self) -> None:
        needed = {"values": "columns", "image": "channels", "classes": "classes"}.get(self.kind)
        if needed is not None and getattr(self, needed) is None:
            raise ValueError(f"a {self.kind!r} summary needs {needed!r}")


class DriftThresholdSpec(_Strict, kw_only=True, omit_defaults=True):
    """The drift thresholds a bundle proposes for its model (the fleet's defaults where
    unset; an operator's per-model settings override both): see ``fleet.drift.stats``."""

    psi: Annotated[float, Meta(gt=0, le=100)] | None = None
    js: Annotated[float, Meta(gt=0, le=1)] | None = None
    wasserstein: Annotated[float, Meta(gt=0, le=1000)] | None = None
    missing: Annotated[float, Meta(gt=0, le=1)] | None = None


class Baseline(_Strict, kw_only=True, omit_defaults=True):
    """``baseline.json``: the training distribution of every feature the device tracks.

    ``summaries`` says how each input and output becomes features; empty (baselines built
    before summaries existed) means the model's one 2-D input, feature ``NAME[i]`` being
    column ``i``. Output features are named ``output:...`` and live in ``features`` too.
    ``thresholds``, when given, are the model's drift thresholds as its builder chose them.
    Fields left at their defaults are left out of the file."""

    rows: Count
    features: Annotated[list[BaselineHistogram], Meta(max_length=MAX_FEATURES)]
    summaries: Annotated[list[SummarySpec], Meta(max_length=2 * MAX_TENSORS)] = []
    thresholds: DriftThresholdSpec | None = None

    def __post_init__(self) -> None:
        names = [histogram.feature for histogram in self.features]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})[:3]
            raise ValueError(f"features named twice: {', '.join(twice)}")


class BundleManifest(_Strict, kw_only=True):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: BundleName
    version: Version
    runtime: Literal["onnx", "tflite"]
    model_file: MemberName
    inputs: Annotated[list[TensorSchema], Meta(min_length=1, max_length=MAX_TENSORS)]
    outputs: Annotated[list[TensorSchema], Meta(min_length=1, max_length=MAX_TENSORS)]
    files: Annotated[dict[MemberName, FileEntry], Meta(min_length=1, max_length=MAX_BUNDLE_FILES)]
    health_check: HealthCheckSpec | None = None
    baseline_file: MemberName | None = None
    created: Timestamp
    # Last, and left out of the file when empty (manifest_bytes): an agent from before
    # this field refuses unknown fields, and still reads bundles whose model has none.
    metadata: ModelMetadata = {}

    @property
    def ref(self) -> BundleRef:
        return BundleRef(name=self.name, version=self.version)

    @property
    def target_name(self) -> str:
        """The bundle's file name in the repository (a TUF target path)."""
        return f"{self.name}-{self.version}.bundle"


def manifest_bytes(manifest: BundleManifest) -> bytes:
    """``manifest.json`` as a bundle carries it: indented JSON, ``metadata`` only when the
    model has some (agents that predate the field refuse it, even empty)."""
    data = msgspec.to_builtins(manifest)
    if not data.get("metadata"):
        data.pop("metadata", None)
    return msgspec.json.format(_ENCODER.encode(data), indent=2)


# ---------------------------------------------------------------------------------------
# What is signed: a desired state's ``signed`` object, as canonical JSON (the TUF/OLPC form
# securesystemslib writes: sorted keys, no whitespace), verified against the director keys
# the trusted TUF root names under DIRECTOR_FIELD in its signed body.
# ---------------------------------------------------------------------------------------

DIRECTOR_FIELD = "x-edgefleet-director"


def signed_bytes(signed: dict[str, Any]) -> bytes:
    """The exact bytes a director signature covers (fleet signs them, agent verifies).

    securesystemslib comes with the trust code on both sides (``tuf``); it is imported here,
    not at the top, so the contract alone still needs nothing but msgspec."""
    from securesystemslib.formats import encode_canonical

    return encode_canonical(signed).encode()


_MODEL_FOR_CHANNEL: dict[Channel, type[DeviceMessage]] = {
    Channel.STATUS: StatusMessage,
    Channel.REPORTED: ReportedState,
    Channel.TELEMETRY: HeartbeatTelemetry,
    Channel.EVENTS: EventMessage,
    Channel.DRIFT: DriftMessage,
}

DeviceMessageT = StatusMessage | ReportedState | HeartbeatTelemetry | EventMessage | DriftMessage
StructT = TypeVar("StructT", bound=msgspec.Struct)


@cache
def _decoder(kind: type[StructT]) -> msgspec.json.Decoder[StructT]:
    return msgspec.json.Decoder(kind)


_ENCODER = msgspec.json.Encoder()


def _oversized(size: int) -> MessageRejected:
    return MessageRejected(
        "oversized", f"{size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte bound"
    )


def _describe(exc: msgspec.ValidationError) -> str:
    """``Expected `int` >= 0 - at `$.seq``` -> ``field 'seq': Expected `int` >= 0``."""
    text, _, path = str(exc).partition(" - at `")
    where = path.rstrip("`").removeprefix("$").lstrip(".")  # e.g. features[3].counts[0]
    unknown = re.match(r"Object contains unknown field `(.+)`$", text)
    if unknown:  # name the offending key itself, under its parent
        where = f"{where}.{unknown[1]}" if where else unknown[1]
    return f"field {where or 'message'!r}: {text}"


def decode(kind: type[StructT], payload: bytes | str) -> StructT:
    """Parse and validate JSON as ``kind`` in one pass, or raise MessageRejected."""
    try:
        return _decoder(kind).decode(payload)
    except RecursionError:  # free JSON nested deeper than the parser's stack
        raise MessageRejected("malformed_json", "JSON nested too deeply") from None
    except msgspec.ValidationError as exc:
        # Validation runs while parsing, so broken JSON that starts with the wrong type
        # ("[1, 2") reports a type error first; name the real problem.
        # The stdlib parser, not msgspec's: it reads 1e999 as infinity, which is valid
        # JSON for a field that must be finite, so the field gets named.
        try:
            json.loads(payload)
        except (ValueError, RecursionError) as syntax:
            raise MessageRejected("malformed_json", str(syntax)) from None
        raise MessageRejected("invalid", _describe(exc)) from None
    except msgspec.DecodeError as exc:
        raise MessageRejected("malformed_json", str(exc)) from None


def convert(kind: type[StructT], data: Any) -> StructT:
    """Validate already-parsed JSON data (dicts, lists, strings) as ``kind``."""
    try:
        return msgspec.convert(data, kind)
    except RecursionError:
        raise MessageRejected("invalid", "data nested too deeply") from None
    except msgspec.ValidationError as exc:
        raise MessageRejected("invalid", _describe(exc)) from None


def validated(message: StructT) -> StructT:
    """Check a struct built in code against its constraints (construction does not)."""
    return convert(type(message), msgspec.to_builtins(message))


def to_data(message: msgspec.Struct) -> dict[str, Any]:
    """The message as JSON-ready dicts and lists (timestamps as RFC 3339 strings)."""
    return msgspec.to_builtins(message)


def to_json(message: msgspec.Struct, indent: int = 0) -> bytes:
    """JSON bytes of any struct, unbounded (files such as manifests, not MQTT messages)."""
    data = _ENCODER.encode(message)
    return msgspec.json.format(data, indent=indent) if indent else data


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a valid message; refuses to produce one the other side would refuse."""
    data = _ENCODER.encode(message)
    if len(data) > MAX_MESSAGE_BYTES:
        raise _oversized(len(data))
    decode(type(message), data)
    return data


def _load_json(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _oversized(len(payload))
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageRejected("malformed_json", str(exc)) from None
    except RecursionError:  # e.g. 60 000 nested '[': small, but deeper than Python goes
        raise MessageRejected("malformed_json", "JSON nested too deeply") from None


def decode_device_message(topic_name: str, payload: bytes) -> DeviceMessageT:
    """Validate a device -> fleet message against its topic, or raise MessageRejected."""
    device_id, channel = parse_topic(topic_name)
    if channel not in _MODEL_FOR_CHANNEL:
        raise MessageRejected("wrong_direction", f"devices do not publish on {channel.value!r}")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _oversized(len(payload))
    message = decode(_MODEL_FOR_CHANNEL[channel], payload)  # the hot path: one pass
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
    envelope = convert(SignedDesiredState, data)
    if envelope.signed.device_id != device_id:
        raise MessageRejected(
            "wrong_device",
            f"desired state for {envelope.signed.device_id!r} sent to {device_id!r}",
        )
    return envelope, data["signed"]
