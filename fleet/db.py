"""Database engine and sessions: SQLite by default, PostgreSQL in production.

SQLite is opened in WAL mode with a busy timeout so the ingest thread and API requests can
write concurrently without "database is locked" errors. The schema is Alembic's
(``fleet.migrations``): ``init_db`` migrates to the newest revision.
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from fleet import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from fleet.migrations import SchemaError, upgrade

__all__ = ["SchemaError", "dialect_insert", "init_db", "is_postgresql", "make_engine"]


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


def init_db(engine: Engine) -> None:
    """Bring the database's schema to the newest migration (``fleet.migrations``): under
    a lock, so fleet workers starting together on one PostgreSQL database migrate it once;
    a database made before migrations is taken over, one migrated by a newer edge-fleet
    is refused (``SchemaError``)."""
    upgrade(engine)
