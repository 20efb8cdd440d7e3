"""Health, metrics and token listing: the operator's view of the service itself."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Query, Request

from agent.contract import utcnow
from fleet import telemetry, tokens
from fleet.api.deps import (
    ERROR_RESPONSES,
    AdminToken,
    CurrentToken,
    OptionalIngestDep,
    SessionDep,
)
from fleet.models import TokenPublic

router = APIRouter()


@router.get("/healthz", tags=["system"])
def healthz(ingest: OptionalIngestDep, request: Request) -> dict:
    """``leader``/``worker``: which worker runs the chores (``fleet.leader``); a load
    balancer's probe needs only the status code."""
    publisher = getattr(request.app.state, "publisher", None)
    leadership = getattr(request.app.state, "leadership", None)
    return {
        "status": "ok",
        "worker": leadership.worker_id if leadership is not None else None,
        "leader": leadership.is_leader if leadership is not None else None,
        "ingest_connected": ingest.link.connected if ingest is not None else None,
        "publisher_connected": publisher.connected if publisher is not None else None,
    }


@router.get("/api/v1/metrics", tags=["system"], responses=ERROR_RESPONSES)
def metrics(ingest: OptionalIngestDep, _: CurrentToken) -> dict:
    if ingest is None:
        return {"ingest": None}
    return {"ingest": {**ingest.metrics.snapshot(), "queue_depth": ingest.queue_depth}}


@router.get("/api/v1/tokens", tags=["system"], response_model=list[TokenPublic],
            responses=ERROR_RESPONSES)
def list_tokens(session: SessionDep, _: AdminToken) -> list[TokenPublic]:
    return [
        TokenPublic(
            id=row.id or 0,
            name=row.name,
            role=row.role,
            created_at=row.created_at,
            revoked=row.revoked_at is not None,
        )
        for row in tokens.list_tokens(session)
    ]


@router.get("/api/v1/telemetry/summary", tags=["telemetry"], responses=ERROR_RESPONSES)
def telemetry_summary(
    session: SessionDep,
    _: CurrentToken,
    minutes: float = Query(default=15, gt=0, le=60 * 24 * 31),
) -> dict:
    """Fleet-wide figures over the heartbeats of the last ``minutes``."""
    return telemetry.fleet_summary(session, utcnow() - timedelta(minutes=minutes))
