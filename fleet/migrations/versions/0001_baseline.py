"""Baseline: the schema at commit f6eb092, the last one before migrations.

The tables as ``create_all`` made them then, written out by hand (not read from
``fleet.models``, which moves on): this revision must make the same tables tomorrow as
today. Besides the tables, it holds what ``create_all`` got from outside the column list:
the device table's fillfactor on PostgreSQL and the audit log's append-only triggers
(``fleet.models._AUDIT_APPEND_ONLY_DDL`` at f6eb092).

A database made before migrations existed (tables, no ``alembic_version``) also goes
through this revision, which then creates only what that database lacks: nothing for one
made at f6eb092 (so this amounts to stamping it), and for an older one the tables and
indexes added since, plus the columns the old start-up code added to existing tables
(nullable, or with a server default); any other missing column is an error naming it.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_baseline"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


# BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the auto-numbered rowid.
def _big_id() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    schema = _Existing(sa.inspect(op.get_bind()))

    schema.create_table(
        "apitoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        # SQLAlchemy stores an enum's member names: VIEWER, not viewer.
        sa.Column("role", sa.Enum("VIEWER", "OPERATOR", "ADMIN", name="role"), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("revoked_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    schema.create_index("ix_apitoken_token_hash", "apitoken", ["token_hash"], unique=True)

    schema.create_table(
        "audit_entry",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", _tz(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    schema.create_index("ix_audit_entry_action", "audit_entry", ["action"])
    schema.create_index("ix_audit_entry_actor", "audit_entry", ["actor"])
    schema.create_index("ix_audit_entry_at", "audit_entry", ["at"])
    schema.create_index("ix_audit_entry_hash", "audit_entry", ["hash"])
    schema.create_index("ix_audit_entry_subject", "audit_entry", ["subject"])
    _audit_append_only(schema)

    schema.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )

    schema.create_table(
        "bundle",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("target_name", sa.String(length=256), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=True),
        sa.Column("published_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version"),
        sa.UniqueConstraint("target_name"),
    )
    schema.create_index("ix_bundle_name", "bundle", ["name"])

    schema.create_table(
        "bundle_baseline",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version"),
    )

    schema.create_table(
        "device",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("first_seen", _tz(), nullable=False),
        sa.Column("last_seen", _tz(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("connection", sa.BigInteger(), nullable=False),
        sa.Column("agent_version", sa.String(length=256), nullable=True),
        sa.Column("active_model_name", sa.String(length=256), nullable=True),
        sa.Column("active_model_version", sa.Integer(), nullable=True),
        sa.Column("platform", sa.JSON(), nullable=True),
        sa.Column("desired_generation", sa.BigInteger(), nullable=True),
        sa.Column("reported_seq", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_seq", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat", sa.JSON(), nullable=True),
        sa.Column("heartbeat_at", _tz(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        # Room in each page for HOT updates: every heartbeat rewrites its device's row.
        postgresql_with={"fillfactor": 50},
    )

    schema.create_table(
        "devicedesired",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("bundle_name", sa.String(length=128), nullable=True),
        sa.Column("bundle_version", sa.Integer(), nullable=True),
        sa.Column("issued_at", _tz(), nullable=False),
        sa.Column("issued_by", sa.String(length=128), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("publish_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("published_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )

    schema.create_table(
        "deviceevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("sent_at", _tz(), nullable=False),
        sa.Column("received_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq"),
    )
    schema.create_index("ix_deviceevent_device_id", "deviceevent", ["device_id"])

    schema.create_table(
        "drift_alert",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("raised_at", _tz(), nullable=False),
        sa.Column("cleared_at", _tz(), nullable=True),
        sa.Column("last_window_at", _tz(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=True),
        sa.Column("notice_pending", sa.Boolean(), nullable=False),
        sa.Column("notice_attempts", sa.Integer(), nullable=False),
        sa.Column("notice_next_at", _tz(), nullable=True),
        sa.Column("notice_error", sa.String(length=300), nullable=True),
        sa.Column("notices_sent", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    schema.create_index("ix_drift_alert_device", "drift_alert", ["device_id", "model"])
    schema.create_index("ix_drift_alert_notice", "drift_alert", ["notice_pending"])

    schema.create_table(
        "drift_policy",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=True),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )

    schema.create_table(
        "drift_window",
        sa.Column("id", _big_id(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("window_started_at", _tz(), nullable=True),
        sa.Column("window_ended_at", _tz(), nullable=False),
        sa.Column("received_at", _tz(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("features", sa.JSON(), nullable=True),
        sa.Column("output_counts", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq"),
    )
    schema.create_index("ix_drift_window_device_time", "drift_window",
                        ["device_id", "window_ended_at"])
    schema.create_index("ix_drift_window_model_time", "drift_window",
                        ["model", "window_ended_at"])
    schema.create_index("ix_drift_window_received", "drift_window", ["received_at"])

    schema.create_table(
        "heartbeat",
        sa.Column("uptime_s", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("rss_mb", sa.Float(), nullable=False),
        sa.Column("inference_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("client_error_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("latency_ms_p50", sa.Float(), nullable=True),
        sa.Column("latency_ms_p95", sa.Float(), nullable=True),
        sa.Column("outbox_depth", sa.BigInteger(), nullable=True),
        sa.Column("id", _big_id(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sent_at", _tz(), nullable=False),
        sa.Column("received_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq"),
    )
    schema.create_index("ix_heartbeat_device_time", "heartbeat", ["device_id", "sent_at"])
    schema.create_index("ix_heartbeat_received", "heartbeat", ["received_at"])

    schema.create_table(
        "protected_group",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("selector", sa.String(length=1024), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )

    schema.create_table(
        "rollout",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("bundle_name", sa.String(length=128), nullable=False),
        sa.Column("bundle_version", sa.Integer(), nullable=False),
        sa.Column("selector", sa.String(length=1024), nullable=True),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", _tz(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("finished_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    schema.create_index("ix_rollout_status", "rollout", ["status"])

    schema.create_table(
        "rollout_device",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("notified_at", _tz(), nullable=True),
        sa.Column("redrives", sa.Integer(), nullable=False),
        sa.Column("rolled_back_by_device", sa.Boolean(), nullable=False),
        sa.Column("prev_bundle_name", sa.String(length=128), nullable=True),
        sa.Column("prev_bundle_version", sa.Integer(), nullable=True),
        sa.Column("inferences_at_install", sa.BigInteger(), nullable=False),
        sa.Column("model_errors_at_install", sa.BigInteger(), nullable=False),
        sa.Column("client_errors_at_install", sa.BigInteger(), nullable=False),
        sa.Column("latency_p95_before", sa.Float(), nullable=True),
        sa.Column("connection_at_notify", sa.BigInteger(), nullable=False),
        sa.Column("uptime_at_notify", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )
    schema.create_index("ix_rollout_device_device", "rollout_device", ["device_id"])


def downgrade() -> None:
    raise NotImplementedError(
        "the baseline is not undone (it would drop every table): drop the database instead")


# The database refuses to change or remove audit entries where it can. An attacker with
# the database's owner rights drops these triggers first: verification never relies on them.
_AUDIT_TRIGGERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sqlite": tuple(
        (f"audit_entry_no_{action.lower()}",
         f"CREATE TRIGGER audit_entry_no_{action.lower()} BEFORE {action} ON audit_entry "
         "BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END")
        for action in ("UPDATE", "DELETE")
    ),
    "postgresql": (
        ("audit_entry_append_only",
         "CREATE TRIGGER audit_entry_append_only BEFORE UPDATE OR DELETE ON audit_entry "
         "FOR EACH ROW EXECUTE FUNCTION audit_entry_append_only()"),
        ("audit_entry_no_truncate",
         "CREATE TRIGGER audit_entry_no_truncate BEFORE TRUNCATE ON audit_entry "
         "FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_append_only()"),
    ),
}

_AUDIT_FUNCTION_POSTGRESQL = (
    "CREATE OR REPLACE FUNCTION audit_entry_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "RAISE EXCEPTION USING MESSAGE = 'audit entries are append-only (' "
    "|| TG_OP || ' refused)'; END $$"
)


def _audit_append_only(schema: _Existing) -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(_AUDIT_FUNCTION_POSTGRESQL)
    for name, statement in _AUDIT_TRIGGERS.get(dialect, ()):
        if not schema.has_trigger(name):
            op.execute(statement)


class _Existing:
    """What the database already has, so that a database made before migrations gets only
    what it lacks (see the module docstring). On an empty database it creates everything,
    exactly as written."""

    def __init__(self, inspector: sa.Inspector) -> None:
        self._inspector = inspector
        self._tables = set(inspector.get_table_names())

    def create_table(self, name: str, *elements: sa.schema.SchemaItem, **kw: object) -> None:
        if name not in self._tables:
            op.create_table(name, *elements, **kw)
            return
        present = {column["name"] for column in self._inspector.get_columns(name)}
        for column in elements:
            if not isinstance(column, sa.Column) or column.name in present:
                continue
            if not (column.nullable or column.server_default is not None):
                raise RuntimeError(
                    f"table {name!r} lacks column {column.name!r}, which cannot be added to "
                    "existing rows; recreate the database"
                )
            op.add_column(name, column)

    def create_index(self, name: str, table: str, columns: list[str],
                     unique: bool = False) -> None:
        if table in self._tables and name in {
                index["name"] for index in self._inspector.get_indexes(table)}:
            return
        op.create_index(name, table, columns, unique=unique)

    def has_trigger(self, name: str) -> bool:
        if "audit_entry" not in self._tables:
            return False
        bind = op.get_bind()
        if bind.dialect.name == "postgresql":
            query = "SELECT 1 FROM pg_trigger WHERE tgname = :name AND NOT tgisinternal"
        else:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = :name"
        return bind.execute(sa.text(query), {"name": name}).first() is not None
