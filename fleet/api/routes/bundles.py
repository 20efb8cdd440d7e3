from __future__ import annotations

from fastapi import APIRouter

from agent.contract import BundleRef
from fleet import audit, deployments, registry
from fleet.api.deps import (
    ERROR_RESPONSES,
    CurrentToken,
    OperatorToken,
    PublisherDep,
    RepositoryDep,
    SessionDep,
)
from fleet.models import BundlePublic, DeploymentCreate, DeploymentPublic

router = APIRouter(tags=["bundles"], responses=ERROR_RESPONSES)


@router.get("/bundles", response_model=list[BundlePublic])
def list_bundles(session: SessionDep, _: CurrentToken) -> list[BundlePublic]:
    return [BundlePublic.model_validate(row, from_attributes=True)
            for row in registry.list_bundles(session)]


@router.post("/deployments", response_model=DeploymentPublic, status_code=202)
def deploy(
    body: DeploymentCreate,
    session: SessionDep,
    token: OperatorToken,
    publisher: PublisherDep,
    repository: RepositoryDep,
) -> DeploymentPublic:
    """Point devices at a published bundle (signed, retained desired state per device)."""
    connected = publisher.connected
    generations = deployments.assign(
        session,
        repository.online_signer("director"),
        publisher.publish,
        BundleRef(name=body.bundle, version=body.version),
        body.devices,
        issued_by=audit.token_actor(token),
        allow_unknown=body.allow_unknown,
    )
    note = None if connected else (
        "the broker is unreachable: the desired states are signed and stored, and are "
        "published when the fleet is connected again")
    return DeploymentPublic(bundle=body.bundle, version=body.version, generations=generations,
                            published=connected, note=note)
