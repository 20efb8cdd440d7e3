"""Device registry: applying device messages to the device table, reading it back.

Every apply function is idempotent and order-tolerant, because MQTT QoS 1 redelivers and
several fleet workers may see the same retained message:

* reported state and heartbeats apply only if their ``seq`` is newer than the stored one;
* status follows the connection rule from ``agent.contract``: a newer connection wins,
  and within one connection the only move is online -> offline;
* ``last_seen`` moves only for fresh messages: a retained copy replayed to a (re)starting
  fleet says nothing about when the device was last there.
"""

from __future__ import annotations

from sqlmodel import Session, select

from agent.contract import (
    EventMessage,
    HeartbeatTelemetry,
    ReportedState,
    StatusMessage,
    utcnow,
)
from fleet.db import dialect_insert
from fleet.models import Device, DeviceEvent

__all__ = [
    "apply_event",
    "apply_heartbeat",
    "apply_reported",
    "apply_status",
    "get_device",
    "list_devices",
    "list_events",
    "lock_devices",
    "touch",
]


def lock_devices(session: Session, device_ids: set[str]) -> None:
    """Row-lock (and register, if new) every device of an ingest batch in one or two
    statements, instead of two per message. Sorted ids: concurrent workers cannot deadlock."""
    if not device_ids:
        return
    ordered = sorted(device_ids)
    locked = session.info.setdefault("locked_devices", {})
    locked.update({row.id: row for row in _select_for_update(session, ordered)})
    missing = [device_id for device_id in ordered if device_id not in locked]
    if missing:
        table = Device.__table__  # type: ignore[attr-defined]
        now = utcnow()
        session.connection().execute(
            dialect_insert(session)(table).on_conflict_do_nothing(),
            [{"id": device_id, "first_seen": now} for device_id in missing],
        )
        locked.update({row.id: row for row in _select_for_update(session, missing)})


def _select_for_update(session: Session, ids: list[str]) -> list[Device]:
    query = select(Device).where(Device.id.in_(ids))  # type: ignore[attr-defined]
    return list(session.exec(query.order_by(Device.id).with_for_update()))


def _device_for_update(session: Session, device_id: str) -> Device:
    """The device's row, locked for this transaction (registered first if it is new)."""
    if device_id not in session.info.get("locked_devices", {}):
        lock_devices(session, {device_id})
    return session.info["locked_devices"][device_id]


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
    device.platform = message.platform.model_dump()
    device.desired_generation = message.desired_generation
    return True


def apply_heartbeat(session: Session, message: HeartbeatTelemetry) -> bool:
    device = _device_for_update(session, message.device_id)
    device.last_seen = utcnow()
    if message.seq <= device.heartbeat_seq:
        return False
    device.heartbeat_seq = message.seq
    device.heartbeat = message.model_dump(
        mode="json", exclude={"schema_version", "device_id", "seq", "kind"}
    )
    device.heartbeat_at = message.sent_at
    return True


def apply_event(session: Session, message: EventMessage) -> bool:
    """Store an event once: a redelivered copy hits the (device_id, seq) constraint."""
    touch(session, message.device_id)
    insert = dialect_insert(session)
    result = session.execute(
        insert(DeviceEvent)
        .values(
            device_id=message.device_id,
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
        .order_by(DeviceEvent.seq.desc())  # type: ignore[attr-defined]
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
