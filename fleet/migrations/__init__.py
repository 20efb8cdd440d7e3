"""The fleet's schema as a history of Alembic revisions (``versions/``), applied when a
fleet process opens its database.

The invariant: a database's tables are exactly what the revision in its
``alembic_version`` made them, and only ``upgrade`` here moves that revision, one way
(forwards), under the schema lock:

* **PostgreSQL**: several fleet workers may start at once on one database. ``upgrade``
  holds a session advisory lock (``SCHEMA_LOCK_ID``) on the connection it migrates with,
  from reading the revision until the migration's transaction has committed; the others
  wait, then find the database at head and do nothing. DDL is transactional there: a
  failed migration leaves the database at its previous revision.
* **SQLite**: one fleet serves a data directory, but a local command (``edge-fleet token
  create``) may open the file while ``serve`` starts; an ``flock`` on a file beside the
  database (``fleet.db-migrate.lock``) orders them.

A database at head is checked without the lock (one query), so opening an up-to-date
database costs nothing more than before. A database made before migrations existed (the
fleet's tables, no ``alembic_version``) is taken over by the baseline revision, which
creates only what it lacks (see ``versions/0001_baseline.py``). A database at a revision
this code does not know was migrated by a newer edge-fleet: it is refused, naming both
revisions, before anything is written.

Making a revision: add a file under ``versions/`` whose ``down_revision`` is the current
head (``python -m fleet.migrations revision "what changed"`` writes one from the
difference between ``fleet.models`` and a database at head, for review);
``tests/fleet/test_migrations.py`` fails while the models and the migrations differ.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

__all__ = [
    "BASELINE",
    "SCHEMA_LOCK_ID",
    "Migration",
    "SchemaError",
    "SchemaTooNewError",
    "alembic_config",
    "current_revision",
    "head_revision",
    "known_revisions",
    "upgrade",
]

log = logging.getLogger(__name__)

# Any fixed number: every edge-fleet process that changes the schema takes this lock first.
SCHEMA_LOCK_ID = 0x6564676566  # "edgef"

_HERE = Path(__file__).resolve().parent
BASELINE = "0001_baseline"
_VERSION_TABLE = "alembic_version"


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to what this code needs."""


class SchemaTooNewError(SchemaError):
    """The database was migrated by a newer edge-fleet: its revision is unknown here."""

    def __init__(self, database_revision: str, code_revision: str) -> None:
        self.database_revision = database_revision
        self.code_revision = code_revision
        super().__init__(
            f"the database's schema is at revision {database_revision!r}, which this "
            f"edge-fleet does not know (its newest is {code_revision!r}): a newer edge-fleet "
            "migrated it. Run that version or a later one, or restore a backup taken before "
            "the upgrade"
        )


@dataclass(frozen=True)
class Migration:
    """What ``upgrade`` found and left: ``before`` is None for an empty database and for
    one made before migrations existed (``adopted``)."""

    before: str | None
    after: str
    adopted: bool = False

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config() -> Config:
    """Alembic's configuration for the fleet's migrations (no alembic.ini): set
    ``attributes["connection"]`` before running a command with it."""
    config = Config()
    config.set_main_option("script_location", str(_HERE).replace("%", "%%"))
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    heads = _script().get_heads()
    if len(heads) != 1:
        # Two revisions written on top of the same one: a merge for the developers.
        raise SchemaError(f"the migrations have {len(heads)} heads ({', '.join(heads)}); "
                          "give one of them the other as down_revision")
    return heads[0]


def known_revisions() -> set[str]:
    """Every revision this code knows; a database at any other was migrated by a newer one."""
    return {script.revision for script in _script().walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None when it has no ``alembic_version`` (empty, or made
    before migrations existed)."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    # Read here rather than through Alembic's MigrationContext, which logs at INFO each
    # time it is made: every start of an up-to-date fleet would say it.
    versions: list[str] = []
    if inspect(connection).has_table(_VERSION_TABLE):
        versions = list(connection.execute(
            text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars())
    connection.rollback()  # reading began a transaction: do not hold it
    if len(versions) > 1:
        raise SchemaError(f"the database has {len(versions)} schema revisions "
                          f"({', '.join(versions)}) where one is expected")
    return versions[0] if versions else None


def upgrade(engine: Engine) -> Migration:
    """Bring the database to ``head_revision()``; see the module docstring."""
    head = head_revision()
    found = current_revision(engine)
    if found == head:
        return Migration(found, head)
    with _schema_lock(engine) as connection:
        found = _revision(connection)  # again: another process may have migrated meanwhile
        if found is not None and found not in known_revisions():
            raise SchemaTooNewError(found, head)
        if found == head:
            return Migration(found, head)
        adopted = found is None and _has_fleet_tables(connection)
        if adopted:
            log.warning("the database was made before schema migrations: taking it over at "
                        "revision %s, then upgrading to %s", BASELINE, head)
        log.info("migrating the database's schema from %s to %s", found or "nothing", head)
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
        return Migration(found, head, adopted)


def _has_fleet_tables(connection: Connection) -> bool:
    from sqlmodel import SQLModel

    from fleet import models  # noqa: F401  (registers the tables on SQLModel.metadata)

    tables = set(inspect(connection).get_table_names())
    connection.rollback()
    return bool(tables & set(SQLModel.metadata.tables))


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    """A connection of its own, holding the schema lock while the caller migrates."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            with _advisory_lock(connection):
                yield connection
            return
        database = engine.url.database
        if connection.dialect.name == "sqlite" and database and database != ":memory:" \
                and not database.startswith("file:"):
            with _file_lock(Path(f"{database}-migrate.lock")):
                yield connection
            return
        yield connection  # an in-memory database: nobody else can see it


@contextmanager
def _advisory_lock(connection: Connection) -> Iterator[None]:
    key = {"key": SCHEMA_LOCK_ID}
    held = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar()
    if not held:
        log.info("another edge-fleet process is migrating the database; waiting for it")
        connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
    connection.commit()
    try:
        yield
    finally:
        try:
            connection.rollback()  # a failed migration may leave its transaction open
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            connection.commit()
        except DBAPIError:
            connection.invalidate()  # the server frees a closed session's locks


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another edge-fleet process is migrating the database; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
