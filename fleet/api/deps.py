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

__all__ = ["AdminToken", "CurrentToken", "SessionDep"]

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


def require_admin(token: CurrentToken) -> ApiToken:
    if token.role is not Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs role admin, token has {token.role}")
    return token


AdminToken = Annotated[ApiToken, Depends(require_admin)]
