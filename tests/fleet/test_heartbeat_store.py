"""The heartbeat store keeps each (device, seq) once and reports exactly how many rows were
new, on SQLite and PostgreSQL: duplicates inside one batch, redelivered batches, and a
batch retried after its transaction was rolled back."""

from __future__ import annotations

from sqlmodel import Session

from agent.contract import HeartbeatTelemetry, utcnow
from fleet import telemetry
from fleet.db import init_db, make_engine


def beats(device_id: str, seqs: list[int]) -> list[HeartbeatTelemetry]:
    return [
        HeartbeatTelemetry(device_id=device_id, seq=seq, sent_at=utcnow(), uptime_s=1.0,
                           cpu_percent=2.0, rss_mb=3.0, inference_count=seq, error_count=0,
                           latency_ms_p50=None if seq % 2 else 0.5, outbox_depth=seq)
        for seq in seqs
    ]


def test_each_row_once_and_counts_exact(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            assert telemetry.store_heartbeats(session, beats("cam-1", [1, 2, 2, 3])) == 3
            session.commit()
        with Session(engine) as session:  # a redelivery plus one new
            assert telemetry.store_heartbeats(session, beats("cam-1", [2, 3, 4])) == 1
            session.commit()
        with Session(engine) as session:  # stored, then the transaction fails
            assert telemetry.store_heartbeats(session, beats("cam-1", [5, 6])) == 2
            session.rollback()
        with Session(engine) as session:  # the retry stores them (nothing staged is left)
            assert telemetry.store_heartbeats(session, beats("cam-1", [5, 6])) == 2
            assert telemetry.store_heartbeats(session, beats("cam-2", [1])) == 1
            session.commit()
        with Session(engine) as session:
            rows = telemetry.heartbeats(session, "cam-1", None, 100)
            assert [row.seq for row in rows] == [1, 2, 3, 4, 5, 6]
            assert [row.latency_ms_p50 for row in rows] == [None, 0.5, None, 0.5, None, 0.5]
            assert [row.outbox_depth for row in rows] == [1, 2, 3, 4, 5, 6]
            assert len(telemetry.heartbeats(session, "cam-2", None, 100)) == 1
    finally:
        engine.dispose()
