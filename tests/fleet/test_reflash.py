"""A re-flashed device (new incarnation, seq restarting below the stored one) is taken as a
restart of its sequence; a former incarnation's messages are refused as replays.

The ingest writer runs for real on SQLite and PostgreSQL, handed messages as the MQTT link
would (with an acknowledgement callback); the broker is left out (the end-to-end test,
``tests/e2e/test_reflash.py``, has it).
"""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from agent.contract import (
    EventMessage,
    HeartbeatTelemetry,
    PlatformInfo,
    ReportedState,
    StatusMessage,
    encode,
    topic,
    utcnow,
)
from agent.mqtt import BrokerAddress, Inbound
from fleet import devices, telemetry
from fleet.db import init_db, make_engine
from fleet.devices import MAX_PAST_INCARNATIONS, Verdict, judge
from fleet.ingest import IngestWorker
from fleet.models import AuditEntry, Device, DeviceEvent, DevicePublic, Heartbeat

OLD, NEW = "a" * 16, "b" * 16
HIGH = 2_000_000_000_000_000  # the first incarnation's clock was far ahead
LOW = 1_000_000  # the re-flashed one boots at 1970


@pytest.fixture
def writer(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    worker = IngestWorker(BrokerAddress.parse("mqtt://127.0.0.1:1"), engine)  # never started
    yield worker
    engine.dispose()


def _envelope(seq: int, incarnation: str | None) -> dict:
    return {"device_id": "cam-1", "seq": seq, "sent_at": utcnow(), "incarnation": incarnation}


def _beat(seq: int, incarnation: str | None, cpu: float = 1.0) -> HeartbeatTelemetry:
    return HeartbeatTelemetry(**_envelope(seq, incarnation), uptime_s=1, cpu_percent=cpu,
                              rss_mb=1, inference_count=1, error_count=0)


def _reported(seq: int, incarnation: str | None, version: str) -> ReportedState:
    return ReportedState(**_envelope(seq, incarnation), agent_version=version,
                         platform=PlatformInfo(system="L", release="1", machine="x",
                                               python="3"))


def _status(seq: int, incarnation: str | None, state: str = "online") -> StatusMessage:
    return StatusMessage(**_envelope(seq, incarnation), state=state, connection=seq)


def _event(seq: int, incarnation: str | None, name: str) -> EventMessage:
    return EventMessage(**_envelope(seq, incarnation), event=name)


_CHANNEL = {HeartbeatTelemetry: "telemetry", ReportedState: "reported", StatusMessage: "status",
            EventMessage: "events"}


class _Feed:
    """Hands messages to the writer as batches; remembers what was acknowledged."""

    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker
        self.acked: list[int] = []

    def batch(self, *messages) -> None:
        start = len(self.acked)
        inbound = [Inbound(topic("cam-1", _CHANNEL[type(m)]), encode(m), False,
                           lambda i=i: self.acked.append(i))
                   for i, m in enumerate(messages, start=start)]
        self.worker._handle_batch(inbound)
        assert len(self.acked) == start + len(messages), "each message acknowledged once"


def _device(engine) -> Device:
    with Session(engine) as session:
        device = session.get(Device, "cam-1")
        assert device is not None
        session.expunge(device)
        return device


def _rows(engine, table) -> list[tuple]:
    with Session(engine) as session:
        return [(row.epoch, row.seq) for row in session.exec(
            select(table).where(table.device_id == "cam-1"))]


def _first_incarnation(feed: _Feed) -> None:
    feed.batch(_status(HIGH, OLD), _reported(HIGH + 1, OLD, "1.0"), _beat(HIGH + 2, OLD),
               _event(HIGH + 3, OLD, "installed"))


def test_new_incarnation_below_the_stored_seq_is_applied_and_flagged(writer):
    feed = _Feed(writer)
    _first_incarnation(feed)
    assert _device(writer.engine).heartbeat_seq == HIGH + 2

    feed.batch(_status(LOW, NEW), _reported(LOW + 1, NEW, "2.0"), _beat(LOW + 2, NEW, 42.0),
               _event(LOW + 3, NEW, "started"))

    device = _device(writer.engine)
    assert (device.incarnation, device.epoch, device.past_incarnations) == (NEW, 1, [OLD])
    assert device.online and device.connection == LOW
    assert (device.reported_seq, device.agent_version) == (LOW + 1, "2.0")
    assert device.heartbeat_seq == LOW + 2 and device.heartbeat["cpu_percent"] == 42.0
    assert device.reflashed_at is not None
    assert DevicePublic.from_row(device).reflashed_at is not None
    assert sorted(_rows(writer.engine, Heartbeat)) == [(0, HIGH + 2), (1, LOW + 2)]
    with Session(writer.engine) as session:
        events = [(e.epoch, e.seq, e.event) for e in devices.list_events(session, "cam-1")]
        assert events == [(0, HIGH + 3, "installed"), (1, 0, "reflashed"), (1, LOW + 3, "started")]
        reflashed = session.exec(select(DeviceEvent).where(DeviceEvent.event == "reflashed")).one()
        assert reflashed.detail == {"incarnation": NEW, "previous": OLD, "epoch": 1}
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "device.reflash")).one()
        assert (entry.actor, entry.subject) == ("system:ingest", "device:cam-1")
        # the time series lists the new sequence after the old one, though its seqs are lower
        series = telemetry.heartbeats(session, "cam-1", None, 10)
        assert [(row.epoch, row.seq) for row in series] == [(0, HIGH + 2), (1, LOW + 2)]
    assert writer.metrics.snapshot()["rejected"] == {}


def test_replay_of_the_former_incarnation_changes_nothing(writer):
    feed = _Feed(writer)
    _first_incarnation(feed)
    feed.batch(_status(LOW, NEW), _reported(LOW + 1, NEW, "2.0"), _beat(LOW + 2, NEW))
    before = _device(writer.engine)
    beats, events = _rows(writer.engine, Heartbeat), _rows(writer.engine, DeviceEvent)

    # Higher seqs than anything of the new incarnation, and never stored before.
    replayed = (_status(HIGH + 10, OLD, "offline"), _reported(HIGH + 11, OLD, "1.0"),
                _beat(HIGH + 12, OLD), _event(HIGH + 13, OLD, "installed"))
    feed.batch(*replayed)
    feed.batch(*replayed[:2])  # and again, alone in their batches
    feed.batch(replayed[2])

    after = _device(writer.engine)
    assert after.model_dump(exclude={"last_seen"}) == before.model_dump(exclude={"last_seen"})
    assert _rows(writer.engine, Heartbeat) == beats
    assert _rows(writer.engine, DeviceEvent) == events
    assert writer.metrics.snapshot()["rejected"] == {"stale_incarnation": 7}


def test_within_the_current_incarnation_the_seq_rules_hold(writer):
    feed = _Feed(writer)
    feed.batch(_beat(LOW + 5, NEW, 5.0), _reported(LOW + 6, NEW, "2.0"))
    feed.batch(_beat(LOW + 5, NEW, 5.0), _beat(LOW + 4, NEW, 4.0), _reported(LOW + 3, NEW, "0.1"))

    device = _device(writer.engine)
    assert (device.incarnation, device.epoch, device.reflashed_at) == (NEW, 0, None)
    assert device.heartbeat["cpu_percent"] == 5.0 and device.agent_version == "2.0"
    assert sorted(_rows(writer.engine, Heartbeat)) == [(0, LOW + 4), (0, LOW + 5)]


def test_a_restart_in_mid_batch_applies_only_the_new_sequence_to_the_row(writer):
    """The old incarnation's last heartbeat and the new one's first share a batch: both are
    stored, the row takes the new one although its seq is lower."""
    feed = _Feed(writer)
    _first_incarnation(feed)
    feed.batch(_beat(HIGH + 20, OLD, 20.0), _beat(LOW, NEW, 1.0), _beat(HIGH + 21, OLD, 21.0))

    device = _device(writer.engine)
    assert (device.epoch, device.heartbeat_seq, device.heartbeat["cpu_percent"]) == (1, LOW, 1.0)
    assert sorted(_rows(writer.engine, Heartbeat)) == [(0, HIGH + 2), (0, HIGH + 20), (1, LOW)]
    assert writer.metrics.snapshot()["rejected"] == {"stale_incarnation": 1}


def test_agents_without_incarnation_keep_the_seq_rules_and_upgrade_without_a_restart(writer):
    feed = _Feed(writer)
    feed.batch(_beat(HIGH, None), _reported(HIGH + 1, None, "0.9"))
    feed.batch(_beat(HIGH - 1, None))  # older: stored, not applied
    assert _device(writer.engine).heartbeat_seq == HIGH

    feed.batch(_beat(HIGH + 1000, OLD))  # upgraded in place: the counter goes on

    device = _device(writer.engine)
    assert (device.incarnation, device.epoch, device.reflashed_at) == (OLD, 0, None)
    assert device.heartbeat_seq == HIGH + 1000


def test_seq_reused_by_a_new_incarnation_is_stored_not_dropped(writer):
    feed = _Feed(writer)
    feed.batch(_beat(LOW, OLD), _event(LOW + 1, OLD, "installed"))
    feed.batch(_beat(LOW, NEW), _event(LOW + 1, NEW, "installed"))  # same seqs, new sequence

    assert sorted(_rows(writer.engine, Heartbeat)) == [(0, LOW), (1, LOW)]
    assert sorted(_rows(writer.engine, DeviceEvent)) == [(0, LOW + 1), (1, 0), (1, LOW + 1)]


def test_remembered_incarnations_are_bounded():
    past = [f"{i:016x}" for i in range(MAX_PAST_INCARNATIONS)]
    assert judge(NEW, past, past[-1], LOW, HIGH) is Verdict.STALE
    assert judge(NEW, past, NEW, LOW, HIGH) is Verdict.SAME
    assert judge(NEW, past, None, LOW, HIGH) is Verdict.SAME
    assert judge(None, [], NEW, HIGH + 1, HIGH) is Verdict.ADOPT
    assert judge(None, [], NEW, LOW, HIGH) is Verdict.RESTART
    assert judge(OLD, past, NEW, HIGH + 1, HIGH) is Verdict.RESTART


def test_many_reflashes_remember_only_the_newest_incarnations(writer):
    feed = _Feed(writer)
    names = [f"{i:016x}" for i in range(MAX_PAST_INCARNATIONS + 3)]
    feed.batch(*(_beat(LOW + i, name) for i, name in enumerate(names)))

    device = _device(writer.engine)
    assert device.incarnation == names[-1] and device.epoch == len(names) - 1
    assert device.past_incarnations == names[-2::-1][:MAX_PAST_INCARNATIONS]
