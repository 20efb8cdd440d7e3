"""Desired states that always arrive: publish again what a device has not acknowledged.

A desired state is retained at the broker, so a device that connects later still gets it.
What can still lose one: the broker was away when it was published and the fleet stopped
before it came back (the MQTT client's queue is in memory), or the broker lost its
retained messages. A device acknowledges a desired state by reporting its generation; an
*online* device whose reported generation stays behind the stored one past a timeout is
sent the stored payload again, unchanged (same generation, same signature: the device
treats a copy of what it has as a repeat), with the wait doubling after each attempt and at
most ``max_attempts`` publications in all. Offline devices are left alone: the broker hands
them the retained state when they connect.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlmodel import Session, col, or_, select

from agent.contract import Channel, topic, utcnow
from fleet.deployments import Publisher, mark_published
from fleet.models import Device, DeviceDesired

__all__ = ["DEFAULT_MAX_ATTEMPTS", "DEFAULT_TIMEOUT_S", "due", "resend_unacknowledged"]

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 5


def due(row: DeviceDesired, now: datetime, timeout_s: float, max_attempts: int) -> bool:
    """Whether this stored desired state should be published again now (pure)."""
    if row.payload is None or row.publish_count >= max_attempts:
        return False
    if row.published_at is None:
        return True  # stored, never published (the fleet stopped in between)
    published_at = row.published_at
    if published_at.tzinfo is None:  # SQLite gives naive UTC back
        published_at = published_at.replace(tzinfo=now.tzinfo)
    wait = timeout_s * 2 ** max(row.publish_count - 1, 0)
    return now - published_at >= timedelta(seconds=wait)


def resend_unacknowledged(
    session: Session,
    publish: Publisher,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> list[str]:
    """Publish again the desired states online devices have not acknowledged; returns
    their ids."""
    now = now or utcnow()
    behind = session.exec(
        select(DeviceDesired)
        .join(Device, col(Device.id) == col(DeviceDesired.device_id))
        .where(col(Device.online))
        .where(or_(col(Device.desired_generation).is_(None),
                   col(Device.desired_generation) < col(DeviceDesired.generation)))
        .where(col(DeviceDesired.payload).is_not(None))
        .where(col(DeviceDesired.publish_count) < max_attempts)
    )
    resent = []
    for row in behind:
        if due(row, now, timeout_s, max_attempts):
            assert row.payload is not None
            publish(topic(row.device_id, Channel.DESIRED), row.payload.encode())
            resent.append(row.device_id)
    if resent:
        mark_published(session, resent, now)
    return resent
