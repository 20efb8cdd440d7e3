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
from securesystemslib.signer import Signature, SSlibKey

from agent.contract import DIRECTOR_FIELD, SignedDesiredState, signed_bytes
from agent.errors import UnsignedDesiredStateError

__all__ = ["DirectorKeys", "verify_desired"]


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
    data = signed_bytes(raw_signed)
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
