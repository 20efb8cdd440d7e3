"""Signing desired states: the fleet's "director" (Uptane's name for it).

Generations are per device and only grow; the fleet allocates them in its database
(``fleet.deployments``), this module only signs.
"""

from __future__ import annotations

from securesystemslib.signer import Signer

from agent.contract import DesiredState, SignatureEntry, SignedDesiredState, encode, to_data
from agent.trust.desired import canonical_bytes

__all__ = ["sign_desired"]


def sign_desired(desired: DesiredState, signer: Signer) -> bytes:
    signed = to_data(desired)
    signature = signer.sign(canonical_bytes(signed))
    envelope = SignedDesiredState(
        signed=desired, signatures=[SignatureEntry(keyid=signature.keyid, sig=signature.signature)]
    )
    return encode(envelope)
