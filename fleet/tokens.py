"""API bearer tokens: created once, shown once, stored hashed.

A token is ``ef_`` + 43 url-safe characters (256 random bits). The database keeps its
SHA-256; the plain token exists only in the creator's hands (and, for the first admin
token, in a 0600 file whose path ``edge-fleet serve`` prints). Creating and revoking a
token are audited (``token.create``, ``token.revoke``) in the same transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from agent.contract import utcnow
from agent.private_file import write_private
from fleet import audit
from fleet.errors import NotFoundError
from fleet.models import ApiToken, Role

__all__ = [
    "authenticate",
    "create_token",
    "ensure_admin_token",
    "hash_token",
    "list_tokens",
    "revoke_token",
]

TOKEN_PREFIX = "ef_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def store_token(session: Session, token: str, *, role: Role, name: str, actor: str
                ) -> ApiToken:
    row = ApiToken(name=name, role=role, token_hash=hash_token(token))
    session.add(row)
    session.flush()
    audit.record(session, actor, "token.create", audit.token_actor(row),
                 f"{role.value} token created", {"role": role.value, "name": name})
    session.commit()
    session.refresh(row)
    return row


def create_token(session: Session, *, role: Role, name: str, actor: str
                 ) -> tuple[ApiToken, str]:
    """Store a new token's hash; return the row and the plain token (shown once).
    ``actor`` is who creates it, for the audit log (``cli:alice``)."""
    token = new_token()
    return store_token(session, token, role=role, name=name, actor=actor), token


def authenticate(session: Session, token: str) -> ApiToken | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.exec(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int, *, actor: str) -> ApiToken:
    """Revoke a token for good (its row stays, for the record); idempotent (revoking a
    revoked token changes and records nothing)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no token #{token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.flush()
        audit.record(session, actor, "token.revoke", audit.token_actor(row),
                     f"{row.role} token revoked", {"role": row.role, "name": row.name})
        session.commit()
        session.refresh(row)
    return row


class AdminTokenConflict(RuntimeError):
    """The data directory's admin token file belongs to another database."""


def ensure_admin_token(engine: Engine, token_file: Path) -> bool:
    """On first start (no tokens at all), create an admin token into ``token_file``.

    Returns True when a token was created. Two fleet workers starting at once may both see
    an empty table; both then create a token, which is harmless (each is a valid admin).
    """
    with Session(engine) as session:
        if session.exec(select(ApiToken.id).limit(1)).first() is not None:
            return False
        if token_file.exists():
            # A token of another database (this one has none): overwriting it would lock
            # that fleet's CLI out with a bare 401. A credential is never overwritten.
            raise AdminTokenConflict(
                f"{token_file} holds an admin token, but the database has no tokens at all: "
                "the file belongs to another database. Use another --data-dir for this one, "
                f"or move {token_file} away if its fleet is gone"
            )
        token = new_token()
        # The file first: if it cannot be written, no token exists that nobody holds, and
        # the next start tries again.
        write_private(token_file, (token + "\n").encode())
        store_token(session, token, role=Role.ADMIN, name="initial admin",
                    actor="system:serve")
    return True
