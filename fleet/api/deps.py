"""Dependencies every route declares: a database session and the authenticated caller.

Authentication is a bearer token checked against stored hashes. The token itself is never
logged: failures say only that it was missing or invalid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from fleet.models import ApiToken, Role
from fleet.tokens import authenticate

__all__ = ["AdminToken", "CurrentToken", "OperatorToken", "SessionDep", "require_role"]

_bearer = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


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
