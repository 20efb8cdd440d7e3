"""Tables and API schemas (SQLModel), one family per entity: Base -> table -> Public.

Timestamps are stored timezone-aware where the database can (PostgreSQL); SQLite gives them
back naive, so every Public schema re-attaches UTC: the API always speaks UTC with an offset.
Sequence numbers are BIGINT: devices count to 2**63.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, field_validator
from pydantic import Field as PydanticField
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

from agent.contract import utcnow
from fleet.roles import Role

__all__ = [
    "ActiveModelPublic",
    "ApiToken",
    "DesiredPublic",
    "Device",
    "DevicePublic",
    "HeartbeatFigures",
    "HeartbeatPublic",
    "Role",
    "TokenPublic",
]


def _tz() -> Any:
    return DateTime(timezone=True)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Device(SQLModel, table=True):
    # Every heartbeat rewrites its device's row. Half-empty pages let PostgreSQL keep each
    # new version in the same page ("HOT" updates: no index writes, old versions pruned as
    # pages are read) instead of leaving dead rows for autovacuum to find.
    __table_args__ = {"postgresql_with": {"fillfactor": 50}}

    id: str = Field(primary_key=True, max_length=64)
    first_seen: datetime = Field(default_factory=utcnow, sa_type=_tz())
    last_seen: datetime | None = Field(default=None, sa_type=_tz())
    online: bool = False
    # The connection the online flag belongs to (see agent.contract on status ordering).
    connection: int = Field(default=0, sa_type=BigInteger)
    agent_version: str | None = Field(default=None, max_length=256)
    active_model_name: str | None = Field(default=None, max_length=256)
    active_model_version: int | None = None
    platform: dict | None = Field(default=None, sa_column=Column(JSON))
    desired_generation: int | None = Field(default=None, sa_type=BigInteger)
    reported_seq: int = Field(default=0, sa_type=BigInteger)
    heartbeat_seq: int = Field(default=0, sa_type=BigInteger)
    heartbeat: dict | None = Field(default=None, sa_column=Column(JSON))
    heartbeat_at: datetime | None = Field(default=None, sa_type=_tz())
    # Labels the device reports from its configuration, and tags an operator sets; a
    # selector matches the tags laid over the labels (fleet.selectors).
    labels: dict | None = Field(default=None, sa_column=Column(JSON))
    tags: dict | None = Field(default=None, sa_column=Column(JSON))
    # The device's sequence (see fleet.devices on incarnations): the incarnation its
    # messages carry now, its number here (0 until the first re-flash seen: rows of the
    # time series and events are unique per (device, epoch, seq)), the few incarnations
    # before it (whose messages are refused as replays) and when the last one began.
    incarnation: str | None = Field(default=None, max_length=64)
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    past_incarnations: list | None = Field(default=None, sa_column=Column(JSON))
    reflashed_at: datetime | None = Field(default=None, sa_type=_tz())


class ActiveModelPublic(SQLModel):
    name: str
    version: int


class HeartbeatFigures(SQLModel):
    """What a heartbeat measures: the scalar fields of ``agent.contract.HeartbeatTelemetry``,
    declared here once for the time-series table, the API and the bulk insert (which read
    the columns off the table). ``tests/fleet/test_heartbeat_fields.py`` holds them equal
    to the contract's, so a field added on the device cannot be dropped by the fleet."""

    uptime_s: float
    cpu_percent: float
    rss_mb: float
    inference_count: int = Field(sa_type=BigInteger)
    error_count: int = Field(sa_type=BigInteger)
    # Added after the first release: a server default lets existing rows take the column.
    client_error_count: int = Field(
        default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"}
    )
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    outbox_depth: int | None = Field(default=None, sa_type=BigInteger)


class HeartbeatPublic(HeartbeatFigures):
    sent_at: datetime
    outbox_dropped: dict[str, int] | None = None


class DesiredPublic(SQLModel):
    """What the fleet last told the device to run (signed, retained on ``desired``)."""

    bundle: str | None
    version: int | None
    generation: int
    issued_at: datetime

    _utc = field_validator("issued_at")(_as_utc)


class DevicePublic(SQLModel):
    id: str
    online: bool
    first_seen: datetime
    last_seen: datetime | None
    agent_version: str | None
    active_model: ActiveModelPublic | None
    platform: dict | None
    # The generation the device reports it accepted (from its reported state).
    desired_generation: int | None
    labels: dict[str, str] = {}  # reported by the device
    tags: dict[str, str] = {}  # set by operators; they win over labels in selectors
    desired: DesiredPublic | None = None
    # Whether the device runs what it was told and has accepted that desired state; None
    # when the fleet never told it anything.
    in_sync: bool | None = None
    heartbeat: HeartbeatPublic | None
    # When the device last came back with a new incarnation (state directory wiped:
    # re-flashed, new SD card); None if it never did. ``epoch`` counts those restarts.
    reflashed_at: datetime | None = None
    epoch: int = 0

    _utc = field_validator("first_seen", "last_seen", "reflashed_at")(_as_utc)

    @classmethod
    def from_row(cls, device: Device, desired: DeviceDesired | None = None) -> DevicePublic:
        active = None
        if device.active_model_name is not None and device.active_model_version is not None:
            active = ActiveModelPublic(
                name=device.active_model_name, version=device.active_model_version
            )
        return cls(
            id=device.id,
            online=device.online,
            first_seen=device.first_seen,
            last_seen=device.last_seen,
            agent_version=device.agent_version,
            active_model=active,
            platform=device.platform,
            desired_generation=device.desired_generation,
            labels=device.labels or {},
            tags=device.tags or {},
            desired=None if desired is None else DesiredPublic(
                bundle=desired.bundle_name, version=desired.bundle_version,
                generation=desired.generation, issued_at=desired.issued_at,
            ),
            in_sync=None if desired is None else _in_sync(device, active, desired),
            heartbeat=HeartbeatPublic.model_validate(device.heartbeat)
            if device.heartbeat
            else None,
            reflashed_at=device.reflashed_at,
            epoch=device.epoch,
        )


def _in_sync(device: Device, active: ActiveModelPublic | None, desired: DeviceDesired) -> bool:
    if device.desired_generation != desired.generation:
        return False  # the device has not accepted the newest desired state (yet)
    if desired.bundle_name is None:
        return active is None
    return active is not None and (active.name, active.version) == (
        desired.bundle_name, desired.bundle_version)


class ApiToken(SQLModel, table=True):
    """Only the SHA-256 of a token is stored: tokens are 256-bit random, so a fast hash is
    enough, and a stolen database does not give API access."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    role: Role
    token_hash: str = Field(unique=True, index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    revoked_at: datetime | None = Field(default=None, sa_type=_tz())


class TokenPublic(SQLModel):
    """What the API may show about a token: never the token, never its hash."""

    id: int
    name: str
    role: Role
    created_at: datetime
    revoked: bool

    _utc = field_validator("created_at")(_as_utc)


class Bundle(SQLModel, table=True):
    """A published bundle: the registry's view of a TUF target."""

    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, index=True)
    version: int
    target_name: str = Field(max_length=256, unique=True)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=BigInteger)
    runtime: str = Field(max_length=16)
    manifest: dict = Field(sa_column=Column(JSON))
    published_at: datetime = Field(default_factory=utcnow, sa_type=_tz())


class BundlePublic(SQLModel):
    name: str
    version: int
    target_name: str
    sha256: str
    size: int
    runtime: str
    published_at: datetime

    _utc = field_validator("published_at")(_as_utc)


class DeviceDesired(SQLModel, table=True):
    """The last desired state the fleet signed for a device; ``generation`` only grows."""

    device_id: str = Field(primary_key=True, max_length=64)
    generation: int = Field(default=0, sa_type=BigInteger)
    bundle_name: str | None = Field(default=None, max_length=128)
    bundle_version: int | None = None
    issued_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    issued_by: str = Field(default="", max_length=128)
    # The signed payload as published, so it can be published again unchanged (same
    # generation, same signature) when a device has not acknowledged it.
    payload: str | None = Field(default=None, sa_type=Text)
    publish_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    published_at: datetime | None = Field(default=None, sa_type=_tz())


# Pydantic's patterns run on Rust's regex engine, where `$` is the end of the text.
DeviceIdField = Annotated[str, PydanticField(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


LabelKeyField = Annotated[str, PydanticField(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
LabelValueField = Annotated[str, PydanticField(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")]


class TagsUpdate(BaseModel):
    add: dict[LabelKeyField, LabelValueField] = PydanticField(default_factory=dict,
                                                              max_length=32)
    remove: list[LabelKeyField] = PydanticField(default_factory=list, max_length=32)


class DeploymentCreate(BaseModel):
    bundle: str = PydanticField(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    version: int = PydanticField(ge=0, lt=2**31)
    devices: list[DeviceIdField] = PydanticField(min_length=1, max_length=10_000)
    allow_unknown: bool = PydanticField(
        default=False, description="deploy to ids the fleet has never seen (pre-provision)"
    )


class DeploymentPublic(BaseModel):
    bundle: str
    version: int
    generations: dict[str, int]
    # False when the broker was unreachable: the desired states are signed and stored, and
    # are published (again) by the fleet once it is back; the answer says so.
    published: bool = True
    note: str | None = None


class DeviceEvent(SQLModel, table=True):
    """Events devices report (deployment steps, refusals): stored once per (device, epoch,
    seq). ``epoch`` is the device's sequence number in the fleet (``Device.epoch``): a
    re-flashed device counts ``seq`` again from its clock, perhaps over values its former
    incarnation used, so ``seq`` alone is unique only within one epoch. The fleet's own
    ``reflashed`` event is ``seq`` 0 of the epoch it opens (agents start above 0)."""

    __table_args__ = (
        UniqueConstraint("device_id", "epoch", "seq", name="uq_deviceevent_device_epoch_seq"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    seq: int = Field(sa_type=BigInteger)
    event: str = Field(max_length=64)
    detail: dict = Field(default_factory=dict, sa_column=Column(JSON))
    sent_at: datetime = Field(sa_type=_tz())
    received_at: datetime = Field(default_factory=utcnow, sa_type=_tz())


class DeviceEventPublic(SQLModel):
    epoch: int = 0
    seq: int
    event: str
    detail: dict
    sent_at: datetime
    received_at: datetime

    _utc = field_validator("sent_at", "received_at")(_as_utc)


class Heartbeat(HeartbeatFigures, table=True):
    """The heartbeat time series: one row per (device, epoch, seq), whatever the
    redeliveries. ``epoch`` as in :class:`DeviceEvent`: a re-flashed device may send a
    ``seq`` its former incarnation used, and that heartbeat is new, not a duplicate."""

    __table_args__ = (
        UniqueConstraint("device_id", "epoch", "seq", name="uq_heartbeat_device_epoch_seq"),
        Index("ix_heartbeat_device_time", "device_id", "sent_at"),
        Index("ix_heartbeat_received", "received_at"),
    )

    # BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the auto-numbered rowid.
    id: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer(), "sqlite")
    )
    device_id: str = Field(max_length=64)
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    seq: int = Field(sa_type=BigInteger)
    sent_at: datetime = Field(sa_type=_tz())
    received_at: datetime = Field(sa_type=_tz())


class HeartbeatRow(HeartbeatFigures):
    epoch: int = 0
    seq: int
    sent_at: datetime
    received_at: datetime

    _utc = field_validator("sent_at", "received_at")(_as_utc)


# The database refuses to change or remove audit entries where it can. An attacker with
# the database's owner rights drops these triggers first: verification never relies on them.
_AUDIT_APPEND_ONLY_DDL: dict[str, tuple[str, ...]] = {
    "sqlite": tuple(
        f"CREATE TRIGGER IF NOT EXISTS audit_entry_no_{op.lower()} BEFORE {op} ON audit_entry "
        "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END"
        for op in ("UPDATE", "DELETE")
    ),
    "postgresql": (
        "CREATE OR REPLACE FUNCTION audit_entry_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION USING MESSAGE = 'audit entries are append-only (' "
        "|| TG_OP || ' refused)'; END $$",
        "CREATE TRIGGER audit_entry_append_only BEFORE UPDATE OR DELETE ON audit_entry "
        "FOR EACH ROW EXECUTE FUNCTION audit_entry_append_only()",
        "CREATE TRIGGER audit_entry_no_truncate BEFORE TRUNCATE ON audit_entry "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_append_only()",
    ),
}


def _audit_append_only(_table: Any, connection: Any, **_kw: Any) -> None:
    for statement in _AUDIT_APPEND_ONLY_DDL.get(connection.dialect.name, ()):
        connection.exec_driver_sql(statement)


class AuditEntry(SQLModel, table=True):
    """One entry of the append-only, hash-chained audit log (see ``fleet.audit``).
    ``seq`` is assigned by the appender (1, 2, 3, ... without gaps), not by the database:
    a gap is how a removed entry shows."""

    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entry_at", "at"),
        Index("ix_audit_entry_hash", "hash"),
        {"listeners": [("after_create", _audit_append_only)]},
    )

    seq: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={
        "autoincrement": False})
    at: datetime = Field(sa_type=_tz())
    actor: str = Field(max_length=200, index=True)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=256, index=True)
    reason: str = Field(max_length=1000)
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The chain's head (one row, id 1): the newest entry's seq and hash. Appenders lock
    it, so appends are serialised across fleet workers; verification compares it with the
    newest entry, so removing entries from the end shows too."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int = Field(default=0, sa_type=BigInteger)
    hash: str = Field(max_length=64)


class AuditEntryPublic(SQLModel):
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    reason: str
    details: dict
    prev_hash: str
    hash: str

    _utc = field_validator("at")(_as_utc)


class AuditProblemPublic(SQLModel):
    seq: int | None
    problem: str
    detail: str


class AuditVerifyPublic(SQLModel):
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problems: list[AuditProblemPublic]


class Rollout(SQLModel, table=True):
    """A staged rollout: what goes where, by which policy, and how far it has come. The
    decisions are ``fleet.rollouts.machine``'s; this row is what a restarted controller
    continues from."""

    id: str = Field(primary_key=True, max_length=32)
    bundle_name: str = Field(max_length=128)
    bundle_version: int
    selector: str | None = Field(default=None, max_length=1024)
    policy: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(max_length=32, index=True)
    wave: int = 0
    wave_started_at: datetime | None = Field(default=None, sa_type=_tz())
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    reason: str | None = Field(default=None, max_length=1000)
    finished_at: datetime | None = Field(default=None, sa_type=_tz())


class RolloutDevice(SQLModel, table=True):
    """One device's place and progress in a rollout, and what it measured before the
    install (the gates judge only what changed since)."""

    __tablename__ = "rollout_device"
    __table_args__ = (Index("ix_rollout_device_device", "device_id"),)

    rollout_id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(primary_key=True, max_length=64)
    wave: int
    state: str = Field(max_length=32)
    notified_at: datetime | None = Field(default=None, sa_type=_tz())
    redrives: int = 0
    rolled_back_by_device: bool = False
    prev_bundle_name: str | None = Field(default=None, max_length=128)
    prev_bundle_version: int | None = None
    inferences_at_install: int = Field(default=0, sa_type=BigInteger)
    model_errors_at_install: int = Field(default=0, sa_type=BigInteger)
    client_errors_at_install: int = Field(default=0, sa_type=BigInteger)
    latency_p95_before: float | None = None
    # No longer read (a reconnection alone is not a device's fault: see the offline
    # gate); kept because existing databases have the column, NOT NULL.
    connection_at_notify: int = Field(default=0, sa_type=BigInteger)
    # The agent's uptime when notified: lower later means its agent restarted since.
    uptime_at_notify: float | None = None


class ProtectedGroup(SQLModel, table=True):
    """Devices a rollout may reach only once a second person approved it."""

    __tablename__ = "protected_group"

    name: str = Field(primary_key=True, max_length=64)
    selector: str = Field(max_length=1024)
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_tz())


# --- drift -------------------------------------------------------------------------------


class BundleBaseline(SQLModel, table=True):
    """A published bundle's training baseline (its ``baseline.json``), kept at publish so
    ingest compares drift windows with it without opening the bundle."""

    __tablename__ = "bundle_baseline"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128)
    version: int
    baseline: dict = Field(sa_column=Column(JSON))


class DriftPolicy(SQLModel, table=True):
    """An operator's drift thresholds for one model name, over the bundle's defaults."""

    __tablename__ = "drift_policy"

    model: str = Field(primary_key=True, max_length=128)
    settings: dict = Field(default_factory=dict, sa_column=Column(JSON))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    updated_by: str = Field(default="", max_length=200)


class DriftWindowRow(SQLModel, table=True):
    """One drift message of a device, judged: per feature ``[psi, js, wasserstein,
    missing_delta, severity, rows]`` (None where the window had too few rows to judge).
    Stored once per (device, seq) whatever the redeliveries."""

    __tablename__ = "drift_window"
    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        Index("ix_drift_window_device_time", "device_id", "window_ended_at"),
        Index("ix_drift_window_model_time", "model", "window_ended_at"),
        Index("ix_drift_window_received", "received_at"),
    )

    id: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer(), "sqlite")
    )
    device_id: str = Field(max_length=64)
    seq: int = Field(sa_type=BigInteger)
    model: str = Field(max_length=128)
    version: int
    window_started_at: datetime | None = Field(default=None, sa_type=_tz())
    window_ended_at: datetime = Field(sa_type=_tz())
    received_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    rows: int | None = Field(default=None, sa_type=BigInteger)
    score: float | None = None
    features: dict = Field(default_factory=dict, sa_column=Column(JSON))
    # The output features' counts (k + 3 layout), for comparing model versions on the
    # same device (the rollout's drift gate, fleet.drift.compare).
    output_counts: dict | None = Field(default=None, sa_column=Column(JSON))


class DriftAlert(SQLModel, table=True):
    """A device's drift on one model: raised when its score crosses, cleared (hysteresis)
    when it falls below the clear level. ``notice_*`` is the webhook's outbox: a raised or
    cleared alert waits here until the receiver took it."""

    __tablename__ = "drift_alert"
    __table_args__ = (
        Index("ix_drift_alert_device", "device_id", "model"),
        Index("ix_drift_alert_notice", "notice_pending"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64)
    model: str = Field(max_length=128)
    version: int
    raised_at: datetime = Field(sa_type=_tz())
    cleared_at: datetime | None = Field(default=None, sa_type=_tz())
    last_window_at: datetime = Field(sa_type=_tz())
    score: float
    peak_score: float
    features: list = Field(default_factory=list, sa_column=Column(JSON))  # crossing now
    notice_pending: bool = False  # a change the webhook has not delivered yet
    notice_attempts: int = 0
    notice_next_at: datetime | None = Field(default=None, sa_type=_tz())
    notice_error: str | None = Field(default=None, max_length=300)
    notices_sent: int = 0


class EnrollmentCode(SQLModel, table=True):
    """A one-time code for one device (``edge-fleet devices add``): only the SHA-256 of its
    secret is kept; used once, before it expires. A newer code for the same device
    replaces the older ones still unused."""

    __tablename__ = "enrollment_code"

    id: int | None = Field(default=None, primary_key=True)
    secret_hash: str = Field(unique=True, index=True, max_length=64)
    device_id: str = Field(index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    expires_at: datetime = Field(sa_type=_tz())
    used_at: datetime | None = Field(default=None, sa_type=_tz())
    created_by: str = Field(max_length=160)


class DeviceIdentity(SQLModel, table=True):
    """What enrollment established: the device's public key and its broker account.
    ``revoked_at`` set: its account is gone and it may not enroll again without a new code."""

    __tablename__ = "device_identity"

    device_id: str = Field(primary_key=True, max_length=64)
    public_key: str = Field(sa_type=Text)
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=_tz())
    revoked_at: datetime | None = Field(default=None, sa_type=_tz())
    broker_account: bool = False  # whether the fleet made its broker account


class EnrollmentCodePublic(BaseModel):
    """The code, shown once: the fleet keeps only its hash."""

    device_id: str
    code: str
    expires_at: datetime
    command: str = PydanticField(description="what to run on the device")


class DeviceCreate(BaseModel):
    id: str = PydanticField(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tags: dict[LabelKeyField, LabelValueField] = PydanticField(default_factory=dict,
                                                               max_length=32)
    expires_in_s: float = PydanticField(default=86_400, gt=0, le=30 * 86_400,
                                        description="how long the code stays valid")


class EnrollBody(BaseModel):
    """``POST /api/v1/enroll`` (agent.enrollment.EnrollRequest)."""

    secret: str = PydanticField(min_length=16, max_length=16, pattern=r"^[A-Z2-7]{16}$")
    public_key: str = PydanticField(min_length=1, max_length=1024)
    proof: str = PydanticField(min_length=1, max_length=200)


class EnrollAnswer(BaseModel):
    device_id: str
    broker: str | None = None
    username: str | None = None
    password: str | None = None


class RevocationPublic(BaseModel):
    device_id: str
    revoked_at: datetime
    broker_account_removed: bool
    detail: str
