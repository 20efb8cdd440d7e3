"""The telemetry time series: batched idempotent writes, queries, retention.

Rows are keyed by ``(device_id, seq)`` with a unique constraint, and written with
``INSERT ... ON CONFLICT DO NOTHING``: a QoS 1 redelivery, a replay after a worker restart
or the same message reaching two workers never makes a second row. A batch of messages is
one statement and one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func
from sqlmodel import Session, select

from agent.contract import HeartbeatTelemetry, utcnow
from fleet.db import dialect_insert
from fleet.models import Device, Heartbeat

__all__ = ["delete_older_than", "fleet_summary", "heartbeats", "store_heartbeats"]


def store_heartbeats(session: Session, messages: Sequence[HeartbeatTelemetry]) -> int:
    """Insert new rows; return how many were new (the rest were duplicates)."""
    if not messages:
        return 0
    now = utcnow()
    rows = [
        {
            "device_id": m.device_id,
            "seq": m.seq,
            "sent_at": m.sent_at,
            "received_at": now,
            "uptime_s": m.uptime_s,
            "cpu_percent": m.cpu_percent,
            "rss_mb": m.rss_mb,
            "inference_count": m.inference_count,
            "error_count": m.error_count,
            "latency_ms_p50": m.latency_ms_p50,
            "latency_ms_p95": m.latency_ms_p95,
            "outbox_depth": m.outbox_depth,
        }
        for m in messages
    ]
    # One statement compiled once and cached (parameters passed separately: SQLAlchemy's
    # "insertmanyvalues" batches them), on the Core table, not through the ORM: at
    # thousands of rows a second, compiling a fresh multi-row VALUES per batch was most of
    # the ingest time. RETURNING, not rowcount: drivers disagree on rowcount here.
    statement = _insert_ignoring_duplicates(session)
    result = session.connection().execute(statement, rows)
    return len(result.all())


def _insert_ignoring_duplicates(session: Session):
    table = Heartbeat.__table__  # type: ignore[attr-defined]
    return (
        dialect_insert(session)(table).on_conflict_do_nothing().returning(table.c.id)
    )


def heartbeats(
    session: Session, device_id: str, since: datetime | None, limit: int
) -> list[Heartbeat]:
    query = select(Heartbeat).where(Heartbeat.device_id == device_id)
    if since is not None:
        query = query.where(Heartbeat.sent_at >= since)
    return list(session.exec(query.order_by(Heartbeat.seq).limit(limit)))  # type: ignore[arg-type]


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
