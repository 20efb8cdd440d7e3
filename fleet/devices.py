"""Device registry: applying device messages to the device table, reading it back.

Every apply function is idempotent and order-tolerant, because MQTT QoS 1 redelivers and
several fleet workers may see the same retained message:

* reported state and heartbeats apply only if their ``seq`` is newer than the stored one;
* status follows the connection rule from ``agent.contract``: a newer connection wins,
  and within one connection the only move is online -> offline;
* ``last_seen`` moves only for fresh messages: a retained copy replayed to a (re)starting
  fleet says nothing about when the device was last there.

Incarnations (:func:`admit`, run on every batch before anything is applied): ``seq`` only
grows within one *incarnation* of a device, the random id its state directory got when it
was made. A wiped device (re-flashed, new SD card) starts a new one, counting from its clock,
which may be behind, so its seqs may lie below what the fleet stored. So:

* a message of the current incarnation (or with none: agents from before the field) keeps
  the seq rules above;
* a NEW incarnation of a known device restarts its sequence: the seq watermarks
  (``reported_seq``, ``heartbeat_seq``, ``connection``) go back to 0, ``epoch`` goes up by
  one, ``reflashed_at`` is set, a ``reflashed`` event and an audit entry are stored, and the
  message is applied. The first incarnation a device row meets is adopted without a restart
  when its seq goes on above the watermarks (an agent upgraded in place, or a new device);
* a message of an incarnation seen before that is not the current one is a replay (or a
  copy delayed past the re-flash) and is refused (``stale_incarnation``), whatever its seq.
  Only :data:`MAX_PAST_INCARNATIONS` former incarnations are remembered per device (the
  device row stays small); a replay from one older than those looks like a new incarnation.

Heartbeats and events are unique per (device_id, epoch, seq), not (device_id, seq): the
new sequence may reuse seq values of the old one (two boots at 1970 start at nearly the same
microsecond), and such a heartbeat is new, not a redelivery. Keeping only seqs above the old
watermark instead would drop the re-flashed device's telemetry until it caught up, the very
hole this closes. Within a batch, messages are judged in arrival order; a device's messages
from before its restart in that batch are stored but not applied to its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import msgspec
from sqlalchemy import JSON, bindparam, case, delete, event, update
from sqlalchemy import select as sa_select
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, select

from agent.contract import (
    MAX_LABELS,
    DeviceMessageT,
    EventMessage,
    HeartbeatTelemetry,
    ReportedState,
    StatusMessage,
    to_data,
    utcnow,
)
from fleet import audit
from fleet.db import dialect_insert, is_postgresql
from fleet.models import Device, DeviceDesired, DeviceEvent, Heartbeat
from fleet.pg_bulk import raw_cursor, staged
from fleet.selectors import Selector, SelectorError, effective_labels

__all__ = [
    "MAX_PAST_INCARNATIONS",
    "Admission",
    "Verdict",
    "admit",
    "apply_event",
    "apply_heartbeats",
    "apply_reported",
    "apply_status",
    "desired_states",
    "get_device",
    "judge",
    "list_devices",
    "list_events",
    "load_devices",
    "lock_devices",
    "matching",
    "remove_device",
    "set_tags",
    "touch",
]

MAX_PAST_INCARNATIONS = 16
REFLASHED_EVENT = "reflashed"
INGEST_ACTOR = "system:ingest"


def lock_devices(session: Session, device_ids: set[str]) -> None:
    """Row-lock (and register, if new) every device of an ingest batch in one or two
    statements, instead of two per message. Existing devices are locked in id order, so
    workers do not deadlock over them; a device being registered is locked after them,
    out of order, so while new devices arrive two workers can deadlock: PostgreSQL detects
    it within a second and aborts one transaction, and the ingest retries that batch.
    Only ids are read: the few devices whose rows the batch edits field by field are loaded
    with :func:`load_devices`."""
    locked: set[str] = session.info.setdefault("locked_devices", set())
    ordered = sorted(device_ids - locked)  # held until the transaction ends: not again
    if not ordered:
        return
    locked.update(_lock_ids(session, ordered))
    missing = [device_id for device_id in ordered if device_id not in locked]
    if missing:
        now = utcnow()
        session.connection().execute(
            dialect_insert(session)(_DEVICE).on_conflict_do_nothing(),
            [{"id": device_id, "first_seen": now} for device_id in missing],
        )
        locked.update(_lock_ids(session, missing))


_DEVICE = Device.__table__  # type: ignore[attr-defined]


@event.listens_for(OrmSession, "after_transaction_end")
def _forget_locks(session: OrmSession, transaction) -> None:
    """Row locks end with the outermost transaction; so does the record of them."""
    if transaction.parent is None:
        session.info.pop("locked_devices", None)


def _lock_ids(session: Session, ids: list[str]) -> list[str]:
    if is_postgresql(session):
        # One array parameter: the statement text is the same whatever the batch, so it is
        # prepared once (an IN list of N parameters is a new statement for every N).
        with raw_cursor(session) as cursor:
            cursor.execute(
                "SELECT id FROM device WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,)
            )
            return [row[0] for row in cursor.fetchall()]
    query = (
        sa_select(_DEVICE.c.id).where(_DEVICE.c.id.in_(ids)).order_by(_DEVICE.c.id)
        .with_for_update()
    )
    return list(session.connection().execute(query).scalars())


def load_devices(session: Session, device_ids: set[str]) -> None:
    """Bring the rows of these (already locked) devices into the session in one query."""
    if device_ids:
        list(session.exec(select(Device).where(Device.id.in_(sorted(device_ids)))))  # type: ignore[attr-defined]


def _device_for_update(session: Session, device_id: str) -> Device:
    """The device's row, locked for this transaction (registered first if it is new)."""
    if device_id not in session.info.get("locked_devices", set()):
        lock_devices(session, {device_id})
    device = session.get(Device, device_id)
    assert device is not None  # locked (and so present) above
    return device


class Verdict(StrEnum):
    """What a message's incarnation means for its device's sequence."""

    SAME = "same"  # the current incarnation, or none given: the seq rules decide
    ADOPT = "adopt"  # the device's first incarnation, its sequence going on
    RESTART = "restart"  # a new incarnation: the sequence starts again
    STALE = "stale"  # a former incarnation: a replay, refused


def judge(
    current: str | None, past: Sequence[str], incoming: str | None, seq: int, watermark: int
) -> Verdict:
    """The rule, without IO: ``current``/``past`` are the device's incarnations as stored,
    ``watermark`` the highest seq it has applied (reported, heartbeat or connection)."""
    if incoming is None or incoming == current:
        return Verdict.SAME
    if incoming in past:
        return Verdict.STALE
    if current is None and seq > watermark:
        return Verdict.ADOPT
    return Verdict.RESTART


@dataclass
class _Sequence:
    """A device's sequence as a batch is judged (read once, written once if it changed)."""

    incarnation: str | None
    epoch: int
    past: list[str]
    watermark: int
    restarts: list[tuple[str | None, str, int]] = field(default_factory=list)
    adopted: bool = False


@dataclass
class Admission:
    """:func:`admit`'s answer: each message's epoch (None: refused as a replay) and each
    device's epoch once the batch was judged (its row takes only messages of that one)."""

    epochs: list[int | None]
    current: dict[str, int]

    def applies(self, message: DeviceMessageT, epoch: int | None) -> bool:
        return epoch is not None and epoch == self.current[message.device_id]


_SEQUENCE_COLUMNS = ("id", "incarnation", "epoch", "past_incarnations", "reported_seq",
                     "heartbeat_seq", "connection")


def admit(session: Session, messages: Sequence[DeviceMessageT]) -> Admission:
    """Judge the incarnation of every message of a batch, in order, and write what changed
    (restarts: watermarks reset, epoch, ``reflashed`` event, audit entry). The devices must
    be locked (:func:`lock_devices`). One light query for the batch's rows, whatever their
    number; the full row only for a device that restarts or adopts."""
    ids = sorted({m.device_id for m in messages})
    session.flush()
    query = sa_select(*(_DEVICE.c[name] for name in _SEQUENCE_COLUMNS)).where(
        _DEVICE.c.id.in_(ids))
    sequences = {
        row.id: _Sequence(row.incarnation, row.epoch, list(row.past_incarnations or []),
                          max(row.reported_seq, row.heartbeat_seq, row.connection))
        for row in session.connection().execute(query)
    }
    epochs: list[int | None] = []
    for message in messages:
        known = sequences[message.device_id]
        verdict = judge(known.incarnation, known.past, message.incarnation, message.seq,
                        known.watermark)
        if verdict is Verdict.STALE:
            epochs.append(None)
            continue
        if verdict is Verdict.ADOPT:
            known.incarnation, known.adopted = message.incarnation, True
        elif verdict is Verdict.RESTART:
            assert message.incarnation is not None  # SAME otherwise
            previous = known.incarnation
            if previous is not None:
                known.past = [previous, *(i for i in known.past if i != previous)]
                del known.past[MAX_PAST_INCARNATIONS:]
            known.incarnation, known.watermark = message.incarnation, 0
            known.epoch += 1
            known.restarts.append((previous, message.incarnation, known.epoch))
        epochs.append(known.epoch)
    for device_id, known in sequences.items():
        if known.adopted or known.restarts:
            _write_sequence(session, device_id, known)
    return Admission(epochs, {device_id: known.epoch for device_id, known in sequences.items()})


def _write_sequence(session: Session, device_id: str, known: _Sequence) -> None:
    device = session.get(Device, device_id)
    assert device is not None  # locked, so present
    device.incarnation = known.incarnation
    if not known.restarts:
        return
    now = utcnow()
    device.epoch = known.epoch
    device.past_incarnations = known.past or None
    device.reflashed_at = now
    device.reported_seq = device.heartbeat_seq = device.connection = 0
    insert = dialect_insert(session)
    for previous, incarnation, epoch in known.restarts:
        detail = {"incarnation": incarnation, "previous": previous, "epoch": epoch}
        # seq 0 of the epoch it opens: agents count from their clock, above 0.
        session.execute(insert(DeviceEvent).values(
            device_id=device_id, epoch=epoch, seq=0, event=REFLASHED_EVENT, detail=detail,
            sent_at=now, received_at=now,
        ).on_conflict_do_nothing())
        audit.record(session, INGEST_ACTOR, "device.reflash", f"device:{device_id}",
                     "a new incarnation: the state directory was made again", detail)
    session.flush()


def apply_status(session: Session, message: StatusMessage, fresh: bool = True) -> bool:
    device = _device_for_update(session, message.device_id)
    if fresh:
        device.last_seen = utcnow()
    newer = message.connection > device.connection
    same_going_offline = message.connection == device.connection and message.state == "offline"
    if not (newer or same_going_offline):
        return False
    device.connection = message.connection
    device.online = message.state == "online"
    return True


def apply_reported(session: Session, message: ReportedState, fresh: bool = True) -> bool:
    device = _device_for_update(session, message.device_id)
    if fresh:
        device.last_seen = utcnow()
    if message.seq <= device.reported_seq:
        return False
    device.reported_seq = message.seq
    device.agent_version = message.agent_version
    device.active_model_name = message.active_model.name if message.active_model else None
    device.active_model_version = message.active_model.version if message.active_model else None
    device.platform = to_data(message.platform)
    device.desired_generation = message.desired_generation
    device.labels = dict(message.labels) or None
    return True


def apply_heartbeats(session: Session, messages: Sequence[HeartbeatTelemetry]) -> None:
    """Every device of the batch: seen now; its latest heartbeat kept if newer than the
    stored one. One set-based UPDATE for the whole batch, not one ORM object (or one
    statement) per device: with hundreds of devices per batch that was most of the ingest
    worker's time. The comparison with the stored ``heartbeat_seq`` is in SQL, so the rows
    need not be read first; they are locked first, in id order (:func:`lock_devices`)."""
    latest: dict[str, HeartbeatTelemetry] = {}
    for message in messages:
        if message.device_id not in latest or message.seq > latest[message.device_id].seq:
            latest[message.device_id] = message
    if not latest:
        return
    lock_devices(session, set(latest))
    session.flush()  # pending ORM edits of these rows go first: the rows are expired below
    now = utcnow()
    if is_postgresql(session):
        _update_heartbeats_postgresql(session, latest, now)
    else:
        _update_heartbeats(session, latest, now)
    # Rows of these devices already in the session are now stale: reload on next access.
    for key, row in list(session.identity_map.items()):
        if isinstance(row, Device) and key[1][0] in latest:
            session.expire(row)


_NOT_IN_HEARTBEAT = {"schema_version", "device_id", "seq", "kind", "incarnation"}


def _heartbeat_document(message: HeartbeatTelemetry) -> dict:
    """What ``device.heartbeat`` keeps: the figures, not the envelope."""
    return {k: v for k, v in to_data(message).items() if k not in _NOT_IN_HEARTBEAT}
_HEARTBEAT_STAGE_COLUMNS = {
    "device_id": "text",
    "seq": "bigint",
    "heartbeat": "json",
    "sent_at": "timestamptz",
}
_NEWER = "staged.seq > device.heartbeat_seq"
_UPDATE_HEARTBEATS_FROM_STAGE = f"""
    WITH staged AS (DELETE FROM device_heartbeat_stage RETURNING *)
    UPDATE device SET
        last_seen = %(now)s,
        heartbeat_seq = CASE WHEN {_NEWER} THEN staged.seq ELSE device.heartbeat_seq END,
        heartbeat = CASE WHEN {_NEWER} THEN staged.heartbeat ELSE device.heartbeat END,
        heartbeat_at = CASE WHEN {_NEWER} THEN staged.sent_at ELSE device.heartbeat_at END
    FROM staged WHERE device.id = staged.device_id
"""


def _update_heartbeats_postgresql(
    session: Session, latest: dict[str, HeartbeatTelemetry], now: datetime
) -> None:
    rows = (
        (device_id, m.seq, msgspec.json.encode(_heartbeat_document(m)).decode(), m.sent_at)
        for device_id, m in latest.items()
    )
    with staged(session, "device_heartbeat_stage", _HEARTBEAT_STAGE_COLUMNS, rows) as cursor:
        cursor.execute(_UPDATE_HEARTBEATS_FROM_STAGE, {"now": now})


def _update_heartbeats(
    session: Session, latest: dict[str, HeartbeatTelemetry], now: datetime
) -> None:
    """SQLite (small fleets): one UPDATE executed for each device, in one transaction."""
    newer = _DEVICE.c.heartbeat_seq < bindparam("b_seq")
    statement = (
        update(_DEVICE)
        .where(_DEVICE.c.id == bindparam("b_id"))
        .values(
            last_seen=bindparam("b_now", type_=_DEVICE.c.last_seen.type),
            heartbeat_seq=case((newer, bindparam("b_seq")), else_=_DEVICE.c.heartbeat_seq),
            heartbeat=case((newer, bindparam("b_heartbeat", type_=JSON)),
                           else_=_DEVICE.c.heartbeat),
            heartbeat_at=case(
                (newer, bindparam("b_at", type_=_DEVICE.c.heartbeat_at.type)),
                else_=_DEVICE.c.heartbeat_at,
            ),
        )
    )
    session.connection().execute(statement, [
        {
            "b_id": device_id,
            "b_now": now,
            "b_seq": message.seq,
            "b_heartbeat": _heartbeat_document(message),
            "b_at": message.sent_at,
        }
        for device_id, message in sorted(latest.items())
    ])


def apply_event(session: Session, message: EventMessage, epoch: int = 0) -> bool:
    """Store an event once: a redelivered copy hits the (device_id, epoch, seq) constraint.
    ``epoch``: the one :func:`admit` gave the message."""
    touch(session, message.device_id)
    insert = dialect_insert(session)
    result = session.execute(
        insert(DeviceEvent)
        .values(
            device_id=message.device_id,
            epoch=epoch,
            seq=message.seq,
            event=message.event,
            detail=message.detail,
            sent_at=message.sent_at,
            received_at=utcnow(),
        )
        .on_conflict_do_nothing()
    )
    return bool(result.rowcount)


def list_events(session: Session, device_id: str, limit: int = 100) -> list[DeviceEvent]:
    """The newest ``limit`` events of a device, oldest first."""
    newest = session.exec(
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id)
        # (epoch, seq): a re-flashed device's new seqs may be below its former ones.
        .order_by(DeviceEvent.epoch.desc(), DeviceEvent.seq.desc())  # type: ignore[attr-defined]
        .limit(limit)
    )
    return list(reversed(list(newest)))


def touch(session: Session, device_id: str) -> None:
    """Any valid message proves the device is alive."""
    _device_for_update(session, device_id).last_seen = utcnow()


def list_devices(session: Session) -> list[Device]:
    return list(session.exec(select(Device).order_by(Device.id)))


def get_device(session: Session, device_id: str) -> Device | None:
    return session.get(Device, device_id)


def set_tags(
    session: Session, device_id: str, add: dict[str, str], remove: list[str]
) -> Device | None:
    """Set and remove an operator's tags on a device (None if it is unknown)."""
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        return None
    tags = {k: v for k, v in (device.tags or {}).items() if k not in remove}
    tags.update(add)
    if len(tags) > MAX_LABELS:
        raise SelectorError(f"a device carries at most {MAX_LABELS} tags")
    device.tags = tags or None
    session.add(device)
    session.commit()
    session.refresh(device)
    return device


def matching(session: Session, selector: Selector) -> list[Device]:
    """The devices whose labels and tags the selector matches, in id order."""
    return [device for device in list_devices(session)
            if selector.matches(effective_labels(device.labels, device.tags))]


def remove_device(session: Session, device_id: str) -> bool:
    """Forget a device: its row, desired state, events and heartbeats. False if unknown.
    A device that still runs registers again with its next message."""
    if session.get(Device, device_id) is None:
        return False
    for table in (Heartbeat, DeviceEvent, DeviceDesired):
        session.execute(delete(table).where(table.device_id == device_id))  # type: ignore[attr-defined]
    session.execute(delete(Device).where(Device.id == device_id))  # type: ignore[arg-type]
    session.commit()
    return True


def desired_states(
    session: Session, device_ids: list[str] | None = None
) -> dict[str, DeviceDesired]:
    """What the fleet last told each device (all devices when ``device_ids`` is None)."""
    query = select(DeviceDesired)
    if device_ids is not None:
        query = query.where(DeviceDesired.device_id.in_(device_ids))  # type: ignore[attr-defined]
    return {row.device_id: row for row in session.exec(query)}
