"""Bulk writes on PostgreSQL: COPY rows into a staging table, then one set-based statement
(``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, ``UPDATE ... FROM``) consumes them.

Why: COPY is PostgreSQL's bulk path and psycopg formats COPY rows in C, while any
parameterised multi-row statement (VALUES lists, SQLAlchemy's insertmanyvalues, executemany,
unnest over arrays) makes Python format every value: at thousands of rows a second that was
the largest share of the ingest worker's time. COPY itself can neither skip duplicates nor
update, hence the staging table: a temporary table (one per database connection) emptied at
every commit (``ON COMMIT DELETE ROWS``), so a rolled-back or retried batch leaves nothing
behind. The consuming statement *moves* the rows out (``WITH staged AS (DELETE ...
RETURNING ...)``), so the stage is empty again for the next use in the same transaction.
The stage is declared ``IF NOT EXISTS`` on every use (a fraction of a millisecond) rather
than remembered per connection: a creation rolled back with a failed batch would otherwise
be remembered wrongly.

Table, stage and column names come from code, never from input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

__all__ = ["copy_insert_ignoring_duplicates", "raw_cursor", "staged"]


@contextlib.contextmanager
def raw_cursor(session: Session) -> Iterator[Any]:
    """A driver cursor on the session's connection, inside its transaction. Driver errors
    leave as SQLAlchemy's (``OperationalError`` for a lost server, a deadlock or a lock
    timeout), so callers handle them exactly as errors from ORM statements: the ingest
    retries its batch on ``OperationalError``."""
    dbapi_connection = session.connection().connection.dbapi_connection
    dialect = session.get_bind().dialect
    cursor = dbapi_connection.cursor()
    try:
        yield cursor
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    finally:
        cursor.close()


@contextlib.contextmanager
def staged(
    session: Session, stage: str, columns: Mapping[str, str], rows: Iterable[tuple]
) -> Iterator[Any]:
    """COPY ``rows`` (tuples in the order of ``columns``, which maps each column name to its
    PostgreSQL type) into the temporary table ``stage``, within the session's transaction.
    Yields the raw psycopg cursor for the statement that consumes the stage; that statement
    must read it as ``WITH staged AS (DELETE FROM <stage> RETURNING ...)``."""
    names = ", ".join(columns)
    types = ", ".join(f"{name} {pg_type}" for name, pg_type in columns.items())
    with raw_cursor(session) as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({types}) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        yield cursor


def copy_insert_ignoring_duplicates(
    session: Session,
    table: str,
    columns: Mapping[str, str],
    conflict_columns: tuple[str, ...],
    rows: Iterable[tuple],
) -> int:
    """Store ``rows`` into ``table``, skipping those that hit ``conflict_columns``' unique
    constraint; return how many were new (the rowcount is exact)."""
    stage = f"{table}_stage"
    names = ", ".join(columns)
    with staged(session, stage, columns, rows) as cursor:
        cursor.execute(
            f"WITH staged AS (DELETE FROM {stage} RETURNING {names}) "
            f"INSERT INTO {table} ({names}) SELECT {names} FROM staged "
            f"ON CONFLICT ({', '.join(conflict_columns)}) DO NOTHING"
        )
        return cursor.rowcount
