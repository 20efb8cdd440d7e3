from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status

from agent.contract import BundleRef
from fleet import deployments, registry
from fleet.api.deps import CurrentToken, OperatorToken, SessionDep
from fleet.models import BundlePublic, DeploymentCreate, DeploymentPublic

router = APIRouter(tags=["bundles"])


@router.get("/bundles", response_model=list[BundlePublic])
def list_bundles(session: SessionDep, _: CurrentToken) -> list[BundlePublic]:
    return [BundlePublic.model_validate(row, from_attributes=True)
            for row in registry.list_bundles(session)]


@router.post("/deployments", response_model=DeploymentPublic, status_code=202)
def deploy(
    body: DeploymentCreate, request: Request, session: SessionDep, token: OperatorToken
) -> DeploymentPublic:
    """Point devices at a published bundle (signed, retained desired state per device)."""
    ingest = request.app.state.ingest
    repository = request.app.state.repository
    if ingest is None or repository is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no broker or repository")

    def publish(topic_name: str, payload: bytes) -> None:
        ingest.link.publish(topic_name, payload, qos=1, retain=True)

    try:
        generations = deployments.assign(
            session,
            repository.online_signer("director"),
            publish,
            BundleRef(name=body.bundle, version=body.version),
            body.devices,
            issued_by=f"token:{token.id}:{token.name}",
        )
    except deployments.DeploymentError as exc:
        code = status.HTTP_404_NOT_FOUND if "no published" in str(exc) else 422
        raise HTTPException(code, str(exc)) from None
    return DeploymentPublic(bundle=body.bundle, version=body.version, generations=generations)
