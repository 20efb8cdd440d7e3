"""Desired-state signatures: only the director key delegated by the trusted root counts."""

from __future__ import annotations

import json

import pytest
from securesystemslib.signer import CryptoSigner

from agent.contract import BundleRef, DesiredState, decode_desired, utcnow
from agent.errors import UnsignedDesiredStateError
from agent.trust.desired import DirectorKeys, verify_desired
from fleet.trust.director import sign_desired
from fleet.trust.repository import FleetRepository


@pytest.fixture
def repository(tmp_path) -> FleetRepository:
    repository = FleetRepository(tmp_path)
    repository.init()
    return repository


def _desired(generation: int = 3) -> DesiredState:
    return DesiredState(device_id="dev-1", generation=generation,
                        bundle=BundleRef(name="m", version=2), issued_at=utcnow())


def _keys(repository: FleetRepository) -> DirectorKeys:
    return DirectorKeys.from_root_file(repository.metadata_dir / "root.json")


def test_director_signature_verifies(repository):
    payload = sign_desired(_desired(), repository.online_signer("director"))
    verify_desired(*decode_desired("dev-1", payload), _keys(repository))


def test_signature_by_another_key_is_refused(repository):
    payload = sign_desired(_desired(), CryptoSigner.generate_ed25519())
    with pytest.raises(UnsignedDesiredStateError, match="0 valid director signature"):
        verify_desired(*decode_desired("dev-1", payload), _keys(repository))


def test_changed_body_breaks_the_signature(repository):
    payload = json.loads(sign_desired(_desired(), repository.online_signer("director")))
    payload["signed"]["bundle"]["version"] = 1  # point the device at another bundle
    with pytest.raises(UnsignedDesiredStateError):
        verify_desired(*decode_desired("dev-1", json.dumps(payload).encode()), _keys(repository))


def test_a_rotated_director_key_no_longer_counts(repository):
    old = repository.online_signer("director")
    repository.rotate("director")
    payload = sign_desired(_desired(), old)
    with pytest.raises(UnsignedDesiredStateError):
        verify_desired(*decode_desired("dev-1", payload), _keys(repository))
    fresh = sign_desired(_desired(), repository.online_signer("director"))
    verify_desired(*decode_desired("dev-1", fresh), _keys(repository))
