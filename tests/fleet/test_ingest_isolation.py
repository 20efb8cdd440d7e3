"""One message the database refuses costs only that message, never its batch-mates.

The ingest writer runs for real on SQLite and PostgreSQL; the broker is left out (messages
are handed to the writer as the MQTT link would, with an acknowledgement callback), and
the database is made to refuse exactly one row with a trigger: that is the boundary this
test stands in for, a message that passes the contract but trips the database.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import Session, func, select

from agent.contract import EventMessage, HeartbeatTelemetry, encode, topic, utcnow
from agent.mqtt import BrokerAddress, Inbound
from fleet.db import init_db, make_engine
from fleet.ingest import IngestWorker
from fleet.models import DeviceEvent, Heartbeat

_SQLITE_TRIGGER = """
CREATE TRIGGER refuse_poison BEFORE INSERT ON deviceevent
WHEN NEW.event = 'poison' BEGIN SELECT RAISE(ABORT, 'poison row'); END
"""
_POSTGRES_TRIGGER = [
    """CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
       BEGIN IF NEW.event = 'poison' THEN RAISE EXCEPTION 'poison row'; END IF;
       RETURN NEW; END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER refuse_poison BEFORE INSERT ON deviceevent
       FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
]


@pytest.fixture
def writer(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    with engine.begin() as connection:
        statements = ([_SQLITE_TRIGGER] if connection.dialect.name == "sqlite"
                      else _POSTGRES_TRIGGER)
        for statement in statements:
            connection.execute(text(statement))
    worker = IngestWorker(BrokerAddress.parse("mqtt://127.0.0.1:1"), engine)  # never started
    yield worker
    engine.dispose()


def _inbound(channel: str, payload: bytes, acked: list[int], index: int) -> Inbound:
    return Inbound(topic(f"dev-{index % 5}", channel), payload, False,
                   lambda: acked.append(index))


def _batch(acked: list[int], poison_at: set[int]) -> list[Inbound]:
    batch = []
    for index in range(60):
        device_id = f"dev-{index % 5}"
        if index % 2:
            payload = encode(HeartbeatTelemetry(
                device_id=device_id, seq=index, sent_at=utcnow(), uptime_s=1, cpu_percent=1,
                rss_mb=1, inference_count=1, error_count=0))
            batch.append(_inbound("telemetry", payload, acked, index))
        else:
            event = "poison" if index in poison_at else "healthy"
            payload = encode(EventMessage(device_id=device_id, seq=index, sent_at=utcnow(),
                                          event=event))
            batch.append(_inbound("events", payload, acked, index))
    return batch


def _count(engine, table) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(table)).one()


def test_a_row_the_database_refuses_costs_only_its_message(writer):
    acked: list[int] = []
    writer._handle_batch(_batch(acked, poison_at={10, 42}))

    assert sorted(acked) == list(range(60)), "every message is acknowledged exactly once"
    assert _count(writer.engine, Heartbeat) == 30
    assert _count(writer.engine, DeviceEvent) == 28  # 30 events, the 2 poisoned refused
    metrics = writer.metrics.snapshot()
    assert metrics["rejected"] == {"unstorable": 2}
    assert metrics["accepted"] == {"heartbeat": 30, "event": 28}
    assert metrics["heartbeats_stored"] == 30


def test_a_batch_without_poison_is_one_transaction_and_all_stored(writer):
    acked: list[int] = []
    writer._handle_batch(_batch(acked, poison_at=set()))
    assert sorted(acked) == list(range(60))
    assert _count(writer.engine, DeviceEvent) == 30
    assert writer.metrics.snapshot()["rejected"] == {}
