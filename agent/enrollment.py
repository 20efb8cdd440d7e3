"""Enrollment's wire contract: the one-time code, the root fingerprint, the signed proof.

Defined once, here, because both sides compute the same bytes: the fleet when it issues a
code and checks a request, the device when it checks the root it downloaded and signs its
request.

* **Code**: ``EF1-<secret>-<fingerprint>``. The secret (80 random bits) is what the fleet
  stores hashed and accepts once, before it expires. The fingerprint (160 bits) names the
  fleet's root keys, so a device given a code trusts only the root those keys sign; a fleet
  impersonator that serves its own root is refused before the device sends it the secret.
  Base32, case-insensitive, so a code survives being read aloud or retyped.
* **Fingerprint**: SHA-256 over the root role's threshold and its public keys themselves
  (type, scheme, value), not over the key ids (TUF clients do not check that a key id is
  the hash of its key) and not over the root file (a re-signed, longer-lived root with the
  same keys keeps its codes valid).
* **Proof**: the device signs the secret together with its new public key, so the key the
  fleet registers is held by whoever holds the code, and a request cannot be replayed with
  another key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "CODE_PREFIX",
    "MAX_PUBLIC_KEY_CHARS",
    "EnrollRequest",
    "EnrollResponse",
    "EnrollmentCode",
    "proof_message",
    "root_fingerprint",
    "secret_hash",
]

CODE_PREFIX = "EF1"
SECRET_BYTES = 10
FINGERPRINT_BYTES = 20
MAX_PUBLIC_KEY_CHARS = 1024
_SECRET_CHARS = 16  # base32 of 10 bytes, no padding
_FINGERPRINT_CHARS = 32  # base32 of 20 bytes
_CODE = re.compile(
    rf"{CODE_PREFIX}-([A-Z2-7]{{{_SECRET_CHARS}}})-([A-Z2-7]{{{_FINGERPRINT_CHARS}}})"
)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class EnrollmentCode:
    secret: str  # base32, upper case
    fingerprint: bytes

    def __str__(self) -> str:
        return f"{CODE_PREFIX}-{self.secret}-{_b32(self.fingerprint)}"

    @classmethod
    def new(cls, secret: bytes, fingerprint: bytes) -> EnrollmentCode:
        if len(secret) != SECRET_BYTES or len(fingerprint) != FINGERPRINT_BYTES:
            raise ValueError("an enrollment code takes a 10-byte secret and a 20-byte fingerprint")
        return cls(_b32(secret), fingerprint)

    @classmethod
    def parse(cls, text: str) -> EnrollmentCode:
        """ValueError saying what is wrong; dashes, spaces and case are forgiven."""
        cleaned = re.sub(r"[\s]", "", text).upper()
        match = _CODE.fullmatch(cleaned)
        if match is None:
            shown = cleaned[:12] + ("…" if len(cleaned) > 12 else "")
            raise ValueError(
                f"enrollment code {shown!r} is not one: expected {CODE_PREFIX}- followed by "
                f"{_SECRET_CHARS} and {_FINGERPRINT_CHARS} characters of A-Z and 2-7, as "
                "`edge-fleet devices add` prints it"
            )
        fingerprint = base64.b32decode(match.group(2))
        return cls(match.group(1), fingerprint)

    def secret_hash(self) -> str:
        return secret_hash(self.secret)


def secret_hash(secret: str) -> str:
    """What the fleet stores of a code: the secret never rests in its database."""
    return hashlib.sha256(secret.encode()).hexdigest()


def root_fingerprint(root: Any) -> bytes:
    """The fingerprint of a TUF ``Root``'s own role: its threshold and its keys' values."""
    role = root.roles["root"]
    keys = []
    for keyid in role.keyids:
        key = root.keys[keyid]
        keys.append({"keytype": key.keytype, "scheme": key.scheme,
                     "public": key.keyval.get("public", "")})
    keys.sort(key=lambda item: (item["keytype"], item["scheme"], item["public"]))
    canonical = json.dumps({"threshold": role.threshold, "keys": keys}, sort_keys=True,
                           separators=(",", ":")).encode()
    return hashlib.sha256(b"edgefleet-root-v1\n" + canonical).digest()[:FINGERPRINT_BYTES]


def proof_message(secret: str, public_key_pem: str) -> bytes:
    """The bytes the device signs with its new key to enroll."""
    return b"edgefleet-enroll-v1\n" + secret.encode() + b"\n" + public_key_pem.encode()


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/v1/enroll``: the code's secret, the device's public key (PEM, Ed25519)
    and its signature over :func:`proof_message` (base64)."""

    secret: str
    public_key: str
    proof: str


class EnrollResponse(msgspec.Struct):
    """What the device keeps: its id, and where and as whom it joins the broker. ``broker``
    is ``mqtt://HOST:PORT`` (no credentials); ``username``/``password`` are null when the
    fleet does not manage broker accounts (they are given to the device another way)."""

    device_id: str
    broker: str | None = None
    username: str | None = None
    password: str | None = None
