from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from fleet import devices
from fleet.api.deps import CurrentToken, SessionDep
from fleet.models import DevicePublic

router = APIRouter(prefix="/devices", tags=["devices"])


@router.get("", response_model=list[DevicePublic])
def list_devices(session: SessionDep, _: CurrentToken) -> list[DevicePublic]:
    return [DevicePublic.from_row(device) for device in devices.list_devices(session)]


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: CurrentToken) -> DevicePublic:
    device = devices.get_device(session, device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return DevicePublic.from_row(device)
