"""The audit log over REST: filtered reading (any token) and verification (admin)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query

from fleet import audit
from fleet.api.deps import ERROR_RESPONSES, AdminToken, CurrentToken, SessionDep
from fleet.models import AuditEntryPublic, AuditProblemPublic, AuditVerifyPublic

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERROR_RESPONSES)

# Printable text, no control characters (PostgreSQL refuses a NUL in any string).
_TEXT = r"^[^\x00-\x1f\x7f]+$"


@router.get("", response_model=list[AuditEntryPublic])
def list_audit(
    session: SessionDep,
    _: CurrentToken,
    action: str | None = Query(
        default=None, max_length=64, pattern=_TEXT,
        description="an action or its family: token matches token.create and token.revoke"),
    actor: str | None = Query(
        default=None, max_length=200, pattern=_TEXT,
        description="an actor or its prefix up to a colon: token:3 matches token:3:alice"),
    subject: str | None = Query(
        default=None, max_length=256, pattern=_TEXT,
        description="a subject or its prefix up to a colon: bundle:detector matches "
                    "bundle:detector:3"),
    since: datetime | None = Query(default=None, description="ISO 8601 (UTC if no offset)"),
    limit: int = Query(default=100, ge=1, le=1000, description="the newest N entries"),
) -> list[AuditEntryPublic]:
    """The newest entries that match every filter given, oldest first."""
    rows = audit.list_entries(session, action=action, actor=actor, subject=subject,
                              since=since, limit=limit)
    return [AuditEntryPublic.model_validate(row, from_attributes=True) for row in rows]


@router.get("/verify", response_model=AuditVerifyPublic)
def verify_audit(session: SessionDep, _: AdminToken) -> AuditVerifyPublic:
    """Walk the whole chain; ``ok`` is false and ``problems`` names each broken entry."""
    report = audit.verify(session)
    return AuditVerifyPublic(
        ok=report.ok, entries=report.entries, head_seq=report.head_seq,
        head_hash=report.head_hash,
        problems=[AuditProblemPublic(seq=p.seq, problem=p.problem, detail=p.detail)
                  for p in report.problems],
    )
