"""Device enrollment: one-time codes, the device's key, its broker account, revocation.

``issue_code`` (``edge-fleet devices add``) registers a device and makes a code for it;
``enroll`` (``POST /api/v1/enroll``, from ``edge-agent enroll``) spends the code, keeps the
device's public key and makes its broker account; ``revoke`` removes the account (which
ends its live connection) and every unused code. The wire format of codes and proofs is
``agent.enrollment``'s.

Why the code's secret is checked before its proof, and the proof before the code is spent:
a request with someone else's key or a broken signature must not burn a code the real
device still needs. Why the code is claimed by a conditional update inside the same
transaction as the account: two devices racing with one code get one account, for one of
them; the other is told the code is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from agent.contract import DEVICE_ID_PATTERN, utcnow
from agent.enrollment import (
    SECRET_BYTES,
    EnrollmentCode,
    proof_message,
    root_fingerprint,
    secret_hash,
)
from fleet import audit
from fleet.broker.accounts import BrokerAccountError, BrokerAccounts
from fleet.errors import (
    ExpiredCodeError,
    InvalidProofError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
    UnknownCodeError,
    UsedCodeError,
)
from fleet.models import Device, DeviceIdentity, _as_utc
from fleet.models import EnrollmentCode as CodeRow
from fleet.selectors import MAX_LABELS

__all__ = ["Enrolled", "Issued", "Revoked", "enroll", "issue_code", "revoke"]

log = logging.getLogger(__name__)

RESERVED_PREFIX = "edgefleet-"


@dataclass(frozen=True)
class Issued:
    device_id: str
    code: str
    expires_at: datetime


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    password: str | None  # None: this fleet does not manage broker accounts


@dataclass(frozen=True)
class Revoked:
    device_id: str
    revoked_at: datetime
    broker_account_removed: bool
    detail: str


def check_device_id(device_id: str) -> None:
    if re.fullmatch(DEVICE_ID_PATTERN, device_id) is None:
        raise InvalidRequestError(
            f"device id {device_id[:80]!r}: 1-64 of A-Z a-z 0-9 _ . -, starting with a "
            "letter or digit")
    if device_id.startswith(RESERVED_PREFIX):
        raise InvalidRequestError(
            f"device id {device_id!r}: ids starting with {RESERVED_PREFIX!r} are the "
            "fleet's own broker accounts")


def issue_code(
    session: Session, root: object, device_id: str, *, actor: str,
    tags: dict[str, str] | None = None, valid_for: timedelta = timedelta(days=1),
) -> Issued:
    """Register ``device_id`` (if new; ``tags`` set on it) and make its one-time code,
    which replaces any unused one. ``root`` is the fleet's current TUF root (its keys'
    fingerprint rides in the code)."""
    check_device_id(device_id)
    if tags and len(tags) > MAX_LABELS:
        raise InvalidRequestError(f"a device carries at most {MAX_LABELS} tags")
    secret = secrets.token_bytes(SECRET_BYTES)
    code = EnrollmentCode.new(secret, root_fingerprint(root))
    now = utcnow()
    expires_at = now + valid_for
    audit.record(session, actor, "device.code", f"device:{device_id}",
                 "enrollment code issued", {"expires_at": expires_at.isoformat(),
                                            "tags": tags or {}})
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        session.add(Device(id=device_id, tags=tags or None))
    elif tags:
        device.tags = {**(device.tags or {}), **tags}
        session.add(device)
    session.execute(delete(CodeRow).where(col(CodeRow.device_id) == device_id,
                                          col(CodeRow.used_at).is_(None)))
    session.add(CodeRow(secret_hash=code.secret_hash(), device_id=device_id,
                        created_at=now, expires_at=expires_at, created_by=actor[:160]))
    session.commit()
    return Issued(device_id, str(code), expires_at)


def _verify_proof(secret: str, public_key: str, proof: str) -> None:
    try:
        key = load_pem_public_key(public_key.encode())
    except (ValueError, TypeError) as exc:
        raise InvalidProofError(f"public_key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidProofError("public_key must be an Ed25519 key")
    try:
        signature = base64.b64decode(proof, validate=True)
        key.verify(signature, proof_message(secret, public_key))
    except (binascii.Error, ValueError, InvalidSignature):
        raise InvalidProofError(
            "proof is not the key's signature over the code and the key") from None


def enroll(
    session: Session, accounts: BrokerAccounts | None, *, secret: str, public_key: str,
    proof: str,
) -> Enrolled:
    row = session.exec(
        select(CodeRow).where(col(CodeRow.secret_hash) == secret_hash(secret))).first()
    if row is None:
        raise UnknownCodeError("this enrollment code is not one this fleet issued (or it "
                               "was replaced by a newer one, or its device was revoked)")
    if row.used_at is not None:
        raise UsedCodeError(f"this enrollment code was used at {_as_utc(row.used_at)}: "
                            "ask the operator for a new one (edge-fleet devices add)")
    expires_at = _as_utc(row.expires_at)
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise ExpiredCodeError(f"this enrollment code expired at {expires_at}: ask the "
                               "operator for a new one (edge-fleet devices add)")
    _verify_proof(secret, public_key, proof)
    device_id = row.device_id
    audit.record(session, f"device:{device_id}", "device.enroll", f"device:{device_id}",
                 "enrolled with a one-time code",
                 {"key_sha256": _key_digest(public_key)})
    claimed = session.execute(
        update(CodeRow).where(col(CodeRow.id) == row.id, col(CodeRow.used_at).is_(None))
        .values(used_at=now))
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise UsedCodeError("this enrollment code was used a moment ago")
    password = None
    if accounts is not None:
        try:
            password = accounts.add_device(device_id)
        except BrokerAccountError as exc:
            session.rollback()  # the code stays unused: the device may try again
            raise UnavailableError(f"the device's broker account: {exc}") from None
    identity = session.get(DeviceIdentity, device_id)
    if identity is None:
        identity = DeviceIdentity(device_id=device_id, public_key=public_key)
    identity.public_key = public_key
    identity.enrolled_at = now
    identity.revoked_at = None
    identity.broker_account = password is not None
    session.add(identity)
    if session.get(Device, device_id) is None:  # forgotten since the code was issued
        session.add(Device(id=device_id))
    session.commit()
    log.info("%s enrolled (key %s)%s", device_id, _key_digest(public_key)[:16],
             "" if password is not None else "; this fleet makes no broker accounts")
    return Enrolled(device_id, password)


def _key_digest(public_key: str) -> str:
    return hashlib.sha256(public_key.encode()).hexdigest()


def revoke(session: Session, accounts: BrokerAccounts | None, device_id: str, *,
           actor: str) -> Revoked:
    """Remove ``device_id``'s broker account (ending its connection) and its unused codes,
    and mark its identity revoked. The device row stays (its history is evidence)."""
    check_device_id(device_id)
    identity = session.get(DeviceIdentity, device_id)
    if identity is None and session.get(Device, device_id) is None:
        raise NotFoundError(f"no device {device_id!r}")
    removed = False
    if accounts is not None:
        try:
            removed = accounts.remove_device(device_id)
        except BrokerAccountError as exc:
            raise UnavailableError(f"the device's broker account: {exc}") from None
        detail = ("broker account removed and its connection closed" if removed
                  else "it had no broker account")
    else:
        detail = ("this fleet does not manage broker accounts: remove the device's account "
                  "on the broker yourself")
    now = utcnow()
    audit.record(session, actor, "device.revoke", f"device:{device_id}", detail)
    if identity is None:
        identity = DeviceIdentity(device_id=device_id, public_key="", enrolled_at=now)
    identity.revoked_at = now
    identity.broker_account = False
    session.add(identity)
    device = session.get(Device, device_id)
    if device is not None and device.online:
        # Closed by the broker without its Last Will: nothing else will say it left.
        device.online = False
        session.add(device)
    session.execute(delete(CodeRow).where(col(CodeRow.device_id) == device_id,
                                          col(CodeRow.used_at).is_(None)))
    session.commit()
    return Revoked(device_id, now, removed, detail)
