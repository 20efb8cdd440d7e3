"""Drift: the fleet view, a device's history, and a model's drift settings."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, status

from agent.contract import utcnow
from fleet import audit, devices
from fleet.api.deps import ERROR_RESPONSES, CurrentToken, OperatorToken, SessionDep
from fleet.drift import store as drift_store
from fleet.models import _as_utc

router = APIRouter(tags=["drift"], responses=ERROR_RESPONSES)

_DEFAULT_SINCE = timedelta(hours=24)
_SINCE_HELP = "ISO 8601 time (default: 24 hours ago)"


def _since(value: datetime | None) -> datetime:
    return _as_utc(value) if value is not None else utcnow() - _DEFAULT_SINCE


@router.get("/drift")
def fleet_drift(
    session: SessionDep,
    _: CurrentToken,
    model: str | None = Query(default=None, max_length=128, description="one model name"),
    since: datetime | None = Query(default=None, description=_SINCE_HELP),
    all_devices: bool = Query(
        default=False, alias="all",
        description="every device that sent a window, not only the drifting ones"),
    limit: int = Query(default=1000, ge=1, le=10_000),
) -> dict[str, Any]:
    """Which devices drift, on which features, since when, on which model version: per
    device its alert and latest window, the most drifted first."""
    since_at = _since(since)
    return {
        "since": since_at.isoformat(),
        "devices": drift_store.fleet_view(session, model=model, since=since_at,
                                          drifting_only=not all_devices, limit=limit),
    }


@router.get("/devices/{device_id}/drift")
def device_drift(
    device_id: str,
    session: SessionDep,
    _: CurrentToken,
    since: datetime | None = Query(default=None, description=_SINCE_HELP),
    feature: str | None = Query(default=None, max_length=200,
                                description="only this feature's statistics"),
    limit: int = Query(default=500, ge=1, le=5000),
) -> dict[str, Any]:
    """A device's drift windows (newest first, statistics per feature) and alerts."""
    if devices.get_device(session, device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return drift_store.device_history(session, device_id, since=_since(since),
                                      feature=feature, limit=limit)


@router.get("/drift/settings/{model}")
def drift_settings(model: str, session: SessionDep, _: CurrentToken,
                   version: int | None = Query(default=None, ge=1)) -> dict[str, Any]:
    """The settings in force for a model (with ``version``: that bundle's defaults
    included) and what the operator set."""
    row = session.get(drift_store.DriftPolicy, model)
    return {
        "model": model,
        "in_force": drift_store.get_settings(session, model, version).describe(),
        "operator": row.settings if row is not None else {},
    }


@router.put("/drift/settings/{model}")
def set_drift_settings(
    model: str,
    session: SessionDep,
    token: OperatorToken,
    settings: dict[str, Any] = Body(..., description="psi, js, wasserstein, missing, "
                                    "clear_ratio, min_rows, reduction, weights"),
    reason: str = Query(default="set by operator", max_length=500),
) -> dict[str, Any]:
    """Replace the operator's settings for a model (``{}``: back to the defaults)."""
    if len(model) > 128 or not model:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "model name of 1-128 chars")
    row = drift_store.set_settings(session, model, settings, audit.token_actor(token), reason)
    return {
        "model": model,
        "in_force": drift_store.get_settings(session, model).describe(),
        "operator": row.settings,
    }
