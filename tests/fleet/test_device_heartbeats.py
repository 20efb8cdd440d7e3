"""Heartbeats applied to the device registry in bulk, on SQLite and PostgreSQL: the newest
heartbeat wins whatever the arrival order, every heartbeat marks the device seen, unknown
devices are registered, and ORM edits of the same rows in the same transaction survive."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from agent.contract import HeartbeatTelemetry, StatusMessage, utcnow
from fleet import devices
from fleet.db import init_db, make_engine


def beat(device_id: str, seq: int, cpu: float) -> HeartbeatTelemetry:
    return HeartbeatTelemetry(
        device_id=device_id, seq=seq, sent_at=utcnow() - timedelta(seconds=100 - seq),
        uptime_s=float(seq), cpu_percent=cpu, rss_mb=40.0, inference_count=seq, error_count=0,
    )


def test_newest_heartbeat_wins_and_every_device_is_seen(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            devices.lock_devices(session, {"cam-1"})
            devices.apply_status(session, StatusMessage(
                device_id="cam-1", seq=1, sent_at=utcnow(), state="online", connection=7))
            session.flush()
            devices.apply_heartbeats(session, [beat("cam-1", 5, 50.0), beat("cam-1", 3, 30.0),
                                               beat("cam-2", 2, 20.0)])
            session.commit()
        before_stale = utcnow()
        with Session(engine) as session:
            devices.apply_heartbeats(session, [beat("cam-1", 4, 40.0)])  # older than 5
            session.commit()

        with Session(engine) as session:
            cam1 = devices.get_device(session, "cam-1")
            cam2 = devices.get_device(session, "cam-2")
            assert cam1 is not None and cam2 is not None  # cam-2 registered by its heartbeat
            assert (cam1.heartbeat_seq, cam1.heartbeat["cpu_percent"]) == (5, 50.0)
            assert cam1.online and cam1.connection == 7  # the status edit was kept
            assert cam1.last_seen is not None
            # the stale heartbeat still proved the device alive
            assert cam1.last_seen.replace(tzinfo=before_stale.tzinfo) >= before_stale
            assert (cam2.heartbeat_seq, cam2.heartbeat["cpu_percent"]) == (2, 20.0)
            assert "device_id" not in cam2.heartbeat and "seq" not in cam2.heartbeat
    finally:
        engine.dispose()


def test_a_session_reused_after_commit_locks_and_registers_again(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            devices.apply_heartbeats(session, [beat("cam-1", 1, 10.0)])
            assert session.info["locked_devices"] == {"cam-1"}
            session.commit()
            assert "locked_devices" not in session.info  # the locks ended with the commit
            devices.apply_heartbeats(session, [beat("cam-1", 2, 20.0)])
            assert session.info["locked_devices"] == {"cam-1"}
            session.commit()
            assert devices.get_device(session, "cam-1").heartbeat_seq == 2
    finally:
        engine.dispose()


def test_a_lock_conflict_on_the_driver_path_is_an_operational_error(postgres_url):
    """What the ingest retries: a lock it cannot get (here a lock timeout; a deadlock is
    the same class) surfaces as SQLAlchemy's OperationalError, not as a raw driver error."""
    engine = make_engine(postgres_url)
    init_db(engine)
    try:
        with Session(engine) as holder, Session(engine) as waiter:
            devices.lock_devices(holder, {"cam-1"})
            holder.commit()
            devices.lock_devices(holder, {"cam-1"})  # held until holder's transaction ends
            waiter.execute(text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):
                devices.lock_devices(waiter, {"cam-1"})
    finally:
        engine.dispose()
