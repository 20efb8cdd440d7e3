"""Database engine and sessions: SQLite by default, PostgreSQL in production.

SQLite is opened in WAL mode with a busy timeout so the ingest thread and API requests can
write concurrently without "database is locked" errors.
"""

from __future__ import annotations

from sqlalchemy import event, inspect, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateColumn
from sqlmodel import Session, SQLModel, create_engine

from fleet import models  # noqa: F401  (registers the tables on SQLModel.metadata)

__all__ = ["dialect_insert", "init_db", "is_postgresql", "make_engine"]


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def is_postgresql(session: Session) -> bool:
    """Whether the bulk paths (COPY, arrays, UPDATE ... FROM) apply; else SQLite."""
    return session.get_bind().dialect.name == "postgresql"


def dialect_insert(session: Session):
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING on both databases."""
    if is_postgresql(session):
        return postgresql_insert
    return sqlite_insert


# Any fixed number: every edge-fleet process that creates tables takes this lock first.
_SCHEMA_LOCK_ID = 0x6564676566  # "edgef"


def init_db(engine: Engine) -> None:
    """Create missing tables. On PostgreSQL, workers starting together on a fresh database
    would race (two ``CREATE TYPE``, one fails with a unique violation), so creation runs
    under a transaction-scoped advisory lock: the first creates, the others then find
    everything in place."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        SQLModel.metadata.create_all(connection)
        _add_missing_columns(connection)


def _add_missing_columns(connection: Connection) -> None:
    """Columns added to a table since the database was created: ``create_all`` makes
    missing tables only. Until schema migrations exist, a column that can be added to a
    table with rows (nullable, or with a server default) is added here; any other is a
    clear error naming it, never a failed insert at the first heartbeat."""
    existing_tables = set(inspect(connection).get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        present = {column["name"] for column in inspect(connection).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not (column.nullable or column.server_default is not None):
                raise RuntimeError(
                    f"table {table.name!r} lacks column {column.name!r}, which cannot be "
                    "added to existing rows; recreate the database"
                )
            ddl = CreateColumn(column).compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
