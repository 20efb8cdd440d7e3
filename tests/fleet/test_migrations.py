"""The schema goes through Alembic migrations (``fleet.migrations``), on SQLite and
PostgreSQL: the models and the migrations agree; databases at an older revision, or made
before migrations existed, are brought to head with their rows; one migrated by a newer
edge-fleet is refused; fleet processes starting together migrate a fresh database once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeEngine
from sqlmodel import Session, SQLModel

from fleet.db import init_db, make_engine
from fleet.migrations import (
    BASELINE,
    SCHEMA_LOCK_ID,
    SchemaError,
    SchemaTooNewError,
    alembic_config,
    current_revision,
    head_revision,
    known_revisions,
    upgrade,
)
from fleet.models import ApiToken, AuditEntry, Device, DeviceDesired, Role
from tests.fixtures.processes import console_script

LEGACY_SCHEMA = Path(__file__).parent / "legacy_schema"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _differences(connection: Connection) -> list[str]:
    """Alembic's comparison of SQLModel.metadata with the database, one line per change,
    e.g. ``add_table enrollment_code`` or ``add_column device firmware``."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    found = []
    for diff in compare_metadata(context, SQLModel.metadata):
        for kind, *args in diff if isinstance(diff, list) else [diff]:  # lists: per column
            found.append(" ".join([kind, *filter(None, map(_name, args))]))
    return found


def _name(arg: object) -> str | None:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, TypeEngine):
        return repr(arg)
    name = getattr(arg, "name", None)
    return str(name) if name else None


def test_models_and_migrations_agree(engine):
    """Whoever changes a table in fleet.models without a revision gets this failure,
    naming the table and the column."""
    init_db(engine)
    with engine.connect() as connection:
        differences = _differences(connection)
    assert differences == [], (
        "fleet.models and fleet/migrations differ; add a revision (python -m fleet.migrations "
        "revision 'what changed' writes a draft): " + "; ".join(differences))


def test_the_migrations_have_one_head_numbered_last():
    """head_revision refuses two heads (two revisions on one parent); revision ids start
    with their number, so the files list in order."""
    assert head_revision() == max(known_revisions())


def _legacy_statements(dialect: str) -> list[str]:
    """The DDL edge-fleet's create_all ran at f6eb092, the last schema before migrations."""
    body = "\n".join(line for line in (LEGACY_SCHEMA / f"f6eb092.{dialect}.sql").read_text()
                     .splitlines() if not line.startswith("--"))
    return [statement.strip() for statement in body.split(";\n") if statement.strip()]


def _make_legacy(engine: Engine, leave_out: tuple[str, ...] = ()) -> None:
    with engine.begin() as connection:
        for statement in _legacy_statements(engine.dialect.name):
            if not any(marker in statement for marker in leave_out):
                connection.exec_driver_sql(statement)


_T0 = "2026-01-02 03:04:05.000000"


def _seed(engine: Engine) -> None:
    """Rows as the f6eb092 fleet wrote them, in that schema's own terms."""
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO device (id, first_seen, online, connection, reported_seq, "
            "heartbeat_seq, labels) VALUES ('cam-01', :t, true, 3, 7, 9, :labels)"),
            {"t": _T0, "labels": json.dumps({"site": "berlin"})})
        connection.execute(text(
            "INSERT INTO apitoken (name, role, token_hash, created_at) "
            "VALUES ('ops', 'ADMIN', :hash, :t)"), {"hash": "ab" * 32, "t": _T0})
        connection.execute(text(
            "INSERT INTO audit_entry (seq, at, actor, action, subject, reason, details, "
            "prev_hash, hash) VALUES (1, :t, 'cli', 'token.create', 'ops', '', '{}', :p, :h)"),
            {"t": _T0, "p": "0" * 64, "h": "1" * 64})


def _assert_seeded_rows_kept(engine: Engine) -> None:
    with Session(engine) as session:
        device = session.get(Device, "cam-01")
        assert device is not None and device.online and device.heartbeat_seq == 9
        assert device.labels == {"site": "berlin"}
        token = session.get(ApiToken, 1)
        assert token is not None and token.role is Role.ADMIN
        assert session.get(AuditEntry, 1) is not None


def _assert_audit_is_append_only(engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
        connection.execute(text("UPDATE audit_entry SET reason = 'edited'"))
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_entry"))


def test_database_at_the_baseline_upgrades_to_head_keeping_its_rows(engine):
    with engine.connect() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, BASELINE)
        connection.commit()
    assert current_revision(engine) == BASELINE
    _seed(engine)

    done = upgrade(engine)

    assert (done.before, done.after, done.adopted) == (BASELINE, head_revision(), False)
    assert current_revision(engine) == head_revision()
    _assert_seeded_rows_kept(engine)
    _assert_audit_is_append_only(engine)


def test_database_made_before_migrations_is_taken_over_with_its_rows(engine):
    _make_legacy(engine)
    _seed(engine)

    done = upgrade(engine)

    assert (done.before, done.after, done.adopted) == (None, head_revision(), True)
    assert current_revision(engine) == head_revision()
    _assert_seeded_rows_kept(engine)
    _assert_audit_is_append_only(engine)
    if engine.dialect.name == "postgresql":  # made by the old create_all: still there
        with engine.connect() as connection:
            assert connection.execute(text(
                "SELECT reloptions FROM pg_class WHERE relname = 'device'")).scalar() == [
                    "fillfactor=50"]
    with engine.connect() as connection:
        assert _differences(connection) == []
    again = upgrade(engine)
    assert not again.changed


def test_older_database_made_before_migrations_gets_what_it_lacks(engine):
    """A fleet older than f6eb092: no drift alerts table yet, nor two later columns (the
    old start-up code created such tables and added such columns; the baseline does)."""
    _make_legacy(engine, leave_out=("drift_alert",))
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE devicedesired DROP COLUMN publish_count"))
        connection.execute(text("ALTER TABLE device DROP COLUMN tags"))
        connection.execute(text(
            "INSERT INTO devicedesired (device_id, generation, issued_at, issued_by) "
            "VALUES ('cam-01', 4, :t, 'ops')"), {"t": _T0})
    _seed(engine)

    upgrade(engine)

    assert "drift_alert" in inspect(engine).get_table_names()
    _assert_seeded_rows_kept(engine)
    with Session(engine) as session:
        desired = session.get(DeviceDesired, "cam-01")
        assert desired is not None and (desired.generation, desired.publish_count) == (4, 0)
        device = session.get(Device, "cam-01")
        assert device is not None and device.tags is None
    with engine.connect() as connection:
        assert _differences(connection) == []


def test_missing_column_that_existing_rows_cannot_take_is_named(engine):
    _make_legacy(engine)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE rollout_device DROP COLUMN connection_at_notify"))

    with pytest.raises(RuntimeError, match="'rollout_device' lacks column "
                                           "'connection_at_notify'"):
        upgrade(engine)
    if engine.dialect.name == "postgresql":  # transactional DDL: nothing was recorded
        assert current_revision(engine) is None


def test_database_migrated_by_a_newer_fleet_is_refused(engine):
    init_db(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))

    with pytest.raises(SchemaTooNewError) as refused:
        init_db(engine)

    assert "'0099_future'" in str(refused.value)
    assert repr(head_revision()) in str(refused.value)
    assert isinstance(refused.value, SchemaError)
    assert current_revision(engine) == "0099_future"  # left as it was


_MIGRATE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from fleet.db import make_engine
from fleet.migrations import upgrade
done = upgrade(make_engine(sys.argv[1]))
print(json.dumps({"before": done.before, "after": done.after}))
"""


def test_processes_starting_together_migrate_a_fresh_database_once(database_url):
    """Both processes are made to wait on the schema lock (held here), then race for it
    when it is let go: both succeed, one of them made the schema."""
    holder = make_engine(database_url)
    release = _hold_schema_lock(holder, database_url)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", _MIGRATE, database_url], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    try:
        for process in processes:  # each says it waits, then waits
            assert process.stderr is not None
            for line in process.stderr:
                if "waiting for it" in line:
                    break
            else:
                pytest.fail(f"exited without waiting for the lock: {process.wait()}")
        release()
        outcomes = []
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            outcomes.append(json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        holder.dispose()
    assert sorted(outcome["before"] or "" for outcome in outcomes) == ["", head_revision()]
    assert {outcome["after"] for outcome in outcomes} == {head_revision()}
    check = make_engine(database_url)
    try:
        assert current_revision(check) == head_revision()
        with check.connect() as connection:
            assert _differences(connection) == []
    finally:
        check.dispose()


def _hold_schema_lock(engine: Engine, database_url: str):
    """Take the lock the migrating processes take; returns what releases it."""
    if engine.dialect.name == "postgresql":
        connection = engine.connect()
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_ID})
        connection.commit()

        def release() -> None:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_ID})
            connection.commit()
            connection.close()

        return release
    import fcntl

    lock = open(f"{engine.url.database}-migrate.lock", "a")  # noqa: SIM115  (closed by release)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock.close


def test_db_commands_show_and_apply_a_pending_migration(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    legacy = make_engine(f"sqlite:///{data_dir / 'fleet.db'}")
    try:
        _make_legacy(legacy)
    finally:
        legacy.dispose()
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(data_dir)}
    env.pop("EDGEFLEET_DATABASE_URL", None)

    def fleet_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*console_script("edge-fleet"), "db", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    head = head_revision()
    pending = fleet_cli("current")
    assert (pending.returncode, pending.stdout.strip()) == (
        1, f"none (newest: {head}): migration pending"), pending.stderr
    applied = fleet_cli("upgrade")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == f"took over the database made before migrations: {head}"
    current = fleet_cli("current")
    assert (current.returncode, current.stdout.strip()) == (0, f"{head} (newest: {head}): "
                                                               "up to date")
