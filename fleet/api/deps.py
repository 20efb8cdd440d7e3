"""Dependencies every route declares: a database session and the authenticated caller.

Authentication is a bearer token checked against stored hashes. The token itself is never
logged: failures say only that it was missing or invalid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlmodel import Session

from fleet.errors import UnavailableError
from fleet.ingest import IngestWorker
from fleet.models import ApiToken, Role
from fleet.publisher import Publisher, SharedLinkPublisher
from fleet.tokens import authenticate
from fleet.trust.repository import FleetRepository

__all__ = [
    "ERROR_RESPONSES",
    "AdminToken",
    "CurrentToken",
    "ErrorBody",
    "IngestDep",
    "OperatorToken",
    "OptionalIngestDep",
    "OptionalPublisherDep",
    "OptionalRepositoryDep",
    "PublisherDep",
    "RepositoryDep",
    "SessionDep",
    "require_role",
]

_bearer = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


class ErrorBody(BaseModel):
    """Every error the API answers itself (schema validation failures aside, which keep
    FastAPI's list of problems): a message, and the stable reason of a domain error."""

    detail: str
    reason: str | None = None


# What routes declare they may answer besides success and 422 (documented in OpenAPI).
ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 503)
}


def get_ingest(request: Request) -> IngestWorker:
    ingest = request.app.state.ingest
    if ingest is None:
        raise UnavailableError("this fleet runs without a broker")
    return ingest


def get_publisher(request: Request) -> Publisher:
    """Where desired states go out: the fleet's own publisher, else the ingest link."""
    publisher = getattr(request.app.state, "publisher", None)
    if publisher is not None:
        return publisher
    return SharedLinkPublisher(get_ingest(request).link)


def get_repository(request: Request) -> FleetRepository:
    repository = request.app.state.repository
    if repository is None:
        raise UnavailableError("this fleet runs without an update repository")
    return repository


def get_optional_publisher(request: Request) -> Publisher | None:
    """The publisher, or None for a fleet without a broker."""
    if getattr(request.app.state, "publisher", None) is None and request.app.state.ingest is None:
        return None
    return get_publisher(request)


def get_optional_ingest(request: Request) -> IngestWorker | None:
    return request.app.state.ingest


def get_optional_repository(request: Request) -> FleetRepository | None:
    return request.app.state.repository


IngestDep = Annotated[IngestWorker, Depends(get_ingest)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
OptionalPublisherDep = Annotated[Publisher | None, Depends(get_optional_publisher)]
RepositoryDep = Annotated[FleetRepository, Depends(get_repository)]
# For the routes that still answer without one (health, metrics, the open repository).
OptionalIngestDep = Annotated[IngestWorker | None, Depends(get_optional_ingest)]
OptionalRepositoryDep = Annotated[FleetRepository | None, Depends(get_optional_repository)]


def get_current_token(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiToken:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = authenticate(session, credentials.credentials)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return token


CurrentToken = Annotated[ApiToken, Depends(get_current_token)]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def require_role(minimum: Role):
    """A dependency that lets through tokens of ``minimum`` role or above (403 otherwise)."""

    def check(token: CurrentToken) -> ApiToken:
        if _RANK[token.role] < _RANK[minimum]:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"needs role {minimum.value} or above; this token is {token.role.value}",
            )
        return token

    return check


OperatorToken = Annotated[ApiToken, Depends(require_role(Role.OPERATOR))]
AdminToken = Annotated[ApiToken, Depends(require_role(Role.ADMIN))]
