"""The telemetry time series: batched idempotent writes, queries, retention.

Rows are keyed by ``(device_id, epoch, seq)`` with a unique constraint (``epoch``: which
of the device's sequences the seq belongs to, see ``fleet.devices`` on incarnations), and
written with ``INSERT ... ON CONFLICT DO NOTHING``: a QoS 1 redelivery, a replay after a
worker restart or the same message reaching two workers never makes a second row. A batch
of messages is one transaction: on PostgreSQL a COPY and one INSERT (``fleet.pg_bulk``), on
SQLite one executemany.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter

from sqlalchemy import delete, func
from sqlalchemy.dialects import postgresql
from sqlmodel import Session, select

from agent.contract import HeartbeatTelemetry, utcnow
from fleet.db import dialect_insert, is_postgresql
from fleet.models import Device, Heartbeat, HeartbeatFigures
from fleet.pg_bulk import copy_insert_ignoring_duplicates

__all__ = ["delete_older_than", "fleet_summary", "heartbeats", "store_heartbeats"]


# The figures are the columns of HeartbeatFigures (declared once, in fleet.models); the
# row tuples below follow this order, with PostgreSQL types for the COPY staging table.
_FIGURES = tuple(HeartbeatFigures.model_fields)
_figures_of = attrgetter(*_FIGURES)
_TABLE = Heartbeat.__table__  # type: ignore[attr-defined]
_COLUMNS = {
    "device_id": "text",
    "epoch": "integer",
    "seq": "bigint",
    "sent_at": "timestamptz",
    "received_at": "timestamptz",
    **{name: _TABLE.c[name].type.compile(dialect=postgresql.dialect()) for name in _FIGURES},
}


def store_heartbeats(
    session: Session,
    messages: Sequence[HeartbeatTelemetry],
    epochs: Sequence[int] | None = None,
) -> int:
    """Insert new rows; return how many were new (the rest were duplicates).
    ``epochs``: each message's epoch, as ``fleet.devices.admit`` gave it (None: all 0)."""
    if not messages:
        return 0
    now = utcnow()
    epochs = epochs if epochs is not None else [0] * len(messages)
    rows = [(m.device_id, epoch, m.seq, m.sent_at, now, *_figures_of(m))
            for m, epoch in zip(messages, epochs, strict=True)]
    if is_postgresql(session):
        return copy_insert_ignoring_duplicates(
            session, "heartbeat", _COLUMNS, ("device_id", "epoch", "seq"), rows
        )
    # SQLite: one statement compiled once and cached, parameters passed separately.
    # RETURNING, not rowcount: SQLite's executemany rowcount does not count ignored
    # conflicts the same way on every version.
    statement = dialect_insert(session)(_TABLE).on_conflict_do_nothing().returning(_TABLE.c.id)
    names = list(_COLUMNS)
    result = session.connection().execute(
        statement, [dict(zip(names, row, strict=True)) for row in rows]
    )
    return len(result.all())


def heartbeats(
    session: Session, device_id: str, since: datetime | None, limit: int
) -> list[Heartbeat]:
    query = select(Heartbeat).where(Heartbeat.device_id == device_id)
    if since is not None:
        query = query.where(Heartbeat.sent_at >= since)
    # (epoch, seq): a re-flashed device's new seqs may be below its former ones.
    order = (Heartbeat.epoch, Heartbeat.seq)
    return list(session.exec(query.order_by(*order).limit(limit)))  # type: ignore[arg-type]


def delete_older_than(session: Session, cutoff: datetime) -> int:
    result = session.execute(delete(Heartbeat).where(Heartbeat.received_at < cutoff))
    session.commit()
    return result.rowcount


def fleet_summary(session: Session, since: datetime) -> dict:
    """Fleet-wide figures over the heartbeats received since ``since``."""
    devices_total = session.exec(select(func.count()).select_from(Device)).one()
    online = session.exec(
        select(func.count()).select_from(Device).where(Device.online)  # type: ignore[arg-type]
    ).one()
    stats = session.exec(
        select(
            func.count(),
            func.count(func.distinct(Heartbeat.device_id)),
            func.avg(Heartbeat.cpu_percent),
            func.max(Heartbeat.cpu_percent),
            func.avg(Heartbeat.rss_mb),
            func.max(Heartbeat.latency_ms_p95),
            func.max(Heartbeat.outbox_depth),
        ).where(Heartbeat.received_at >= since)
    ).one()
    count, reporting, cpu_avg, cpu_max, rss_avg, p95_max, outbox_max = stats
    return {
        "since": since,
        "devices": devices_total,
        "online": online,
        "heartbeats": count,
        "devices_reporting": reporting,
        "cpu_percent_avg": cpu_avg,
        "cpu_percent_max": cpu_max,
        "rss_mb_avg": rss_avg,
        "latency_ms_p95_max": p95_max,
        "outbox_depth_max": outbox_max,
    }
