from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Query, status

from fleet import audit, devices, telemetry
from fleet.api.deps import ERROR_RESPONSES, CurrentToken, OperatorToken, SessionDep
from fleet.models import DeviceEventPublic, DevicePublic, HeartbeatRow, TagsUpdate
from fleet.selectors import MAX_SELECTOR_CHARS, Selector

router = APIRouter(prefix="/devices", tags=["devices"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[DevicePublic])
def list_devices(
    session: SessionDep,
    _: CurrentToken,
    selector: str | None = Query(
        default=None, max_length=MAX_SELECTOR_CHARS,
        description="only devices whose labels and tags match, e.g. site=berlin,ring!=lab",
    ),
) -> list[DevicePublic]:
    desired = devices.desired_states(session)
    rows = (devices.list_devices(session) if selector is None
            else devices.matching(session, Selector.parse(selector)))
    return [DevicePublic.from_row(device, desired.get(device.id)) for device in rows]


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: CurrentToken) -> DevicePublic:
    device = devices.get_device(session, device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    desired = devices.desired_states(session, [device_id]).get(device_id)
    return DevicePublic.from_row(device, desired)


@router.patch("/{device_id}/tags", response_model=DevicePublic)
def tag_device(
    device_id: str, body: TagsUpdate, session: SessionDep, _: OperatorToken
) -> DevicePublic:
    """Set (``add``) and remove (``remove``) an operator's tags on a device; rollout
    selectors match them over the labels the device reports."""
    device = devices.set_tags(session, device_id, dict(body.add), list(body.remove))
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    desired = devices.desired_states(session, [device_id]).get(device_id)
    return DevicePublic.from_row(device, desired)


@router.delete("/{device_id}", status_code=204)
def remove_device(device_id: str, session: SessionDep, token: OperatorToken) -> None:
    """Forget a device (row, desired state, events, heartbeats). A device that still runs
    registers again with its next message: revoke its broker account to keep it out."""
    # Recorded first, committed by remove_device with the removal; an unknown device
    # commits nothing, so its entry is rolled back with the session.
    audit.record(session, audit.token_actor(token), "device.remove", f"device:{device_id}",
                 "removed by operator")
    if not devices.remove_device(session, device_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")


@router.get("/{device_id}/events", response_model=list[DeviceEventPublic])
def device_events(
    device_id: str,
    session: SessionDep,
    _: CurrentToken,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[DeviceEventPublic]:
    """Deployment steps and refusals the device reported, oldest first."""
    return [
        DeviceEventPublic.model_validate(row, from_attributes=True)
        for row in devices.list_events(session, device_id, limit)
    ]


@router.get("/{device_id}/telemetry", response_model=list[HeartbeatRow])
def device_telemetry(
    device_id: str,
    session: SessionDep,
    _: CurrentToken,
    since: datetime | None = Query(default=None, description="ISO 8601; default: all kept"),
    limit: int = Query(default=1000, ge=1, le=10_000),
) -> list[HeartbeatRow]:
    """The device's heartbeats in seq order (kept for the retention period)."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return [
        HeartbeatRow.model_validate(row, from_attributes=True)
        for row in telemetry.heartbeats(session, device_id, since, limit)
    ]
