"""Verifying a signed desired state against the director keys in the trusted TUF root.

Why a signature on top of the broker's authentication: whoever can publish on a device's
``desired`` topic (a misconfigured ACL, a stolen fleet credential, a broker admin) could
otherwise point the device at any bundle, including an old validly signed one. With the
director signature and a per-device generation that must grow, they can only replay what
the fleet said before, and the agent refuses that too.
"""

from __future__ import annotations

import json
from pathlib import Path

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signature, SSlibKey

from agent.contract import SignedDesiredState
from agent.errors import UnsignedDesiredStateError
from agent.trust import DIRECTOR_FIELD

__all__ = ["DirectorKeys", "canonical_bytes", "verify_desired"]


def canonical_bytes(signed: dict) -> bytes:
    return encode_canonical(signed).encode()


class DirectorKeys:
    """The director's keys and threshold, as delegated by a (trusted) root."""

    def __init__(self, keys: dict[str, SSlibKey], threshold: int) -> None:
        self.keys = keys
        self.threshold = threshold

    @classmethod
    def from_root_file(cls, root_file: Path) -> DirectorKeys:
        """Read from the root.json the TUF client has verified and stored."""
        signed = json.loads(root_file.read_bytes())["signed"]
        field = signed.get(DIRECTOR_FIELD)
        if not isinstance(field, dict):
            raise UnsignedDesiredStateError("trusted root delegates no director key")
        keys = {
            keyid: SSlibKey.from_dict(keyid, dict(value))
            for keyid, value in field.get("keys", {}).items()
        }
        return cls(keys, int(field.get("threshold", 1)))


def verify_desired(envelope: SignedDesiredState, raw_signed: dict, keys: DirectorKeys) -> None:
    """Raise UnsignedDesiredStateError unless ``threshold`` director keys signed it."""
    data = canonical_bytes(raw_signed)
    valid = set()
    for entry in envelope.signatures:
        key = keys.keys.get(entry.keyid)
        if key is None:
            continue
        try:
            key.verify_signature(Signature(entry.keyid, entry.sig), data)
        except UnverifiedSignatureError:
            continue
        valid.add(entry.keyid)
    if len(valid) < keys.threshold:
        raise UnsignedDesiredStateError(
            f"desired state has {len(valid)} valid director signature(s), "
            f"{keys.threshold} required"
        )
