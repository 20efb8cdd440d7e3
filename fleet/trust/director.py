"""Signing desired states: the fleet's "director" (Uptane's name for it).

Generations are per device and only grow; the fleet allocates them in its database
(``fleet.deployments``), this module only signs.
"""

from __future__ import annotations

from securesystemslib.signer import Signer

from agent.contract import (
    DesiredState,
    SignatureEntry,
    SignedDesiredState,
    encode,
    signed_bytes,
    to_data,
)

__all__ = ["sign_desired"]


def sign_desired(desired: DesiredState, signer: Signer) -> bytes:
    signed = to_data(desired)
    signature = signer.sign(signed_bytes(signed))
    envelope = SignedDesiredState(
        signed=desired, signatures=[SignatureEntry(keyid=signature.keyid, sig=signature.signature)]
    )
    return encode(envelope)
