"""Enrollment routes: an operator adds a device and gets its one-time code; the device
spends the code (open: the code is its credential); an operator revokes a device."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status

from agent.contract import Channel, topic
from fleet import audit, enrollment
from fleet.api.deps import (
    ERROR_RESPONSES,
    OperatorToken,
    OptionalPublisherDep,
    RepositoryDep,
    SessionDep,
)
from fleet.api.routes.device_config import DeviceBrokerDep
from fleet.broker.accounts import BrokerAccounts
from fleet.models import (
    DeviceCreate,
    EnrollAnswer,
    EnrollBody,
    EnrollmentCodePublic,
    RevocationPublic,
)

router = APIRouter(tags=["enrollment"], responses=ERROR_RESPONSES)


def get_broker_accounts(request: Request) -> BrokerAccounts | None:
    return getattr(request.app.state, "broker_accounts", None)


AccountsDep = Annotated[BrokerAccounts | None, Depends(get_broker_accounts)]


@router.post("/devices", response_model=EnrollmentCodePublic,
             status_code=status.HTTP_201_CREATED)
def add_device(
    body: DeviceCreate, request: Request, session: SessionDep, token: OperatorToken,
    repository: RepositoryDep,
) -> EnrollmentCodePublic:
    """Register a device (or keep it, for a re-flashed one) and make its one-time
    enrollment code, which replaces any unused one. The code is shown only here."""
    issued = enrollment.issue_code(
        session, repository.root().signed, body.id, actor=audit.token_actor(token),
        tags=body.tags, valid_for=timedelta(seconds=body.expires_in_s))
    fleet_url = str(request.base_url).rstrip("/")
    return EnrollmentCodePublic(
        device_id=issued.device_id, code=issued.code, expires_at=issued.expires_at,
        command=f"edge-agent enroll --fleet {fleet_url} --code {issued.code}")


@router.post("/enroll", response_model=EnrollAnswer)
def enroll_device(
    body: EnrollBody, request: Request, session: SessionDep, accounts: AccountsDep,
    broker: DeviceBrokerDep,
) -> EnrollAnswer:
    """Spend a one-time code: the device's public key is kept, its broker account made.
    Refusals: ``enrollment_code_unknown`` / ``_used`` / ``_expired`` (403),
    ``enrollment_proof_invalid`` (400), the broker unreachable (503, the code stays)."""
    done = enrollment.enroll(session, accounts, secret=body.secret,
                             public_key=body.public_key, proof=body.proof)
    return EnrollAnswer(
        device_id=done.device_id,
        broker=broker.url_for(request.url.hostname) if broker is not None else None,
        username=done.device_id if done.password is not None else None,
        password=done.password)


@router.post("/devices/{device_id}/revoke", response_model=RevocationPublic)
def revoke_device(device_id: str, session: SessionDep, token: OperatorToken,
                  accounts: AccountsDep, publisher: OptionalPublisherDep) -> RevocationPublic:
    """Remove the device's broker account (its live connection is closed, it cannot
    connect again) and its unused codes. Enrolling again needs a new code.

    The broker closes a revoked connection without its Last Will, so the device is marked
    offline here, and its retained presence and reported state are cleared so that no
    worker reads them back as "online" after a restart."""
    done = enrollment.revoke(session, accounts, device_id, actor=audit.token_actor(token))
    if publisher is not None:
        for channel in (Channel.STATUS, Channel.REPORTED):
            publisher.publish(topic(device_id, channel), b"")
    return RevocationPublic(device_id=done.device_id, revoked_at=done.revoked_at,
                            broker_account_removed=done.broker_account_removed,
                            detail=done.detail)
