"""The fleet's enrollment rules, against a real database (SQLite and PostgreSQL) and a real
TUF root: what a code is, which requests spend it, which are refused and why, and that a
refused request never burns the code the real device still needs. The broker is real too
where accounts are made (a private Mosquitto with dynamic security), or really absent."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, select

from agent.enrollment import EnrollmentCode, proof_message, root_fingerprint
from agent.identity import public_key_pem
from agent.mqtt import BrokerAddress
from fleet.broker.dynsec import DynsecAccounts
from fleet.db import init_db, make_engine
from fleet.enrollment import enroll, issue_code, revoke
from fleet.errors import (
    ExpiredCodeError,
    InvalidProofError,
    InvalidRequestError,
    UnavailableError,
    UnknownCodeError,
    UsedCodeError,
)
from fleet.local_broker import LocalBroker, free_port
from fleet.models import Device, DeviceIdentity
from fleet.trust.repository import FleetRepository


@pytest.fixture
def fleet(tmp_path, database_url):
    engine = make_engine(database_url)
    init_db(engine)
    repository = FleetRepository(tmp_path / "fleet")
    repository.init()
    yield engine, repository.root().signed
    engine.dispose()


def _request(code: str, key: Ed25519PrivateKey | None = None) -> dict:
    key = key or Ed25519PrivateKey.generate()
    secret = EnrollmentCode.parse(code).secret
    public = public_key_pem(key)
    proof = base64.b64encode(key.sign(proof_message(secret, public))).decode()
    return {"secret": secret, "public_key": public, "proof": proof}


def test_a_code_names_the_roots_keys_and_survives_retyping(fleet):
    engine, root = fleet
    with Session(engine) as session:
        code = issue_code(session, root, "cam-01", actor="test").code
    parsed = EnrollmentCode.parse(code)
    assert parsed.fingerprint == root_fingerprint(root)
    assert EnrollmentCode.parse(" " + code.lower() + "\n") == parsed
    assert len(code) == 3 + 1 + 16 + 1 + 32
    for broken in ("", "EF1-", code[:-1], code + "A", "EF2" + code[3:], code.replace("-", "")):
        with pytest.raises(ValueError, match="is not one"):
            EnrollmentCode.parse(broken)


def test_the_fingerprint_follows_the_keys_not_the_file(tmp_path):
    repository = FleetRepository(tmp_path / "a")
    repository.init()
    before = root_fingerprint(repository.root().signed)
    repository.rotate("timestamp")  # a new root version, same root keys
    assert repository.root().signed.version == 2
    assert root_fingerprint(repository.root().signed) == before
    other = FleetRepository(tmp_path / "b")
    other.init()
    assert root_fingerprint(other.root().signed) != before


def test_refused_requests_name_why_and_leave_the_code_for_the_real_device(fleet):
    engine, root = fleet
    with Session(engine) as session:
        code = issue_code(session, root, "cam-01", actor="test",
                          tags={"site": "berlin"}).code
    good = _request(code)
    with Session(engine) as session:
        # Someone else's signature over the same code and key: not proof of holding it.
        forged = {**good, "proof": _request(code)["proof"]}
        with pytest.raises(InvalidProofError, match="signature"):
            enroll(session, None, **forged)
        # Not Ed25519.
        ec_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(InvalidProofError, match="Ed25519"):
            enroll(session, None, **{**good, "public_key": ec_key.decode()})
        with pytest.raises(InvalidProofError, match="PEM"):
            enroll(session, None, **{**good, "public_key": "not a key\x00"})
        with pytest.raises(UnknownCodeError):
            enroll(session, None, **{**good, "secret": "A" * 16})

        done = enroll(session, None, **good)  # still unspent: the real device gets in
        assert done.device_id == "cam-01" and done.password is None
        with pytest.raises(UsedCodeError, match="used at"):
            enroll(session, None, **_request(code))
        identity = session.get(DeviceIdentity, "cam-01")
        assert identity is not None and identity.public_key == good["public_key"]
        assert session.get(Device, "cam-01").tags == {"site": "berlin"}


def test_a_newer_code_replaces_the_older_and_codes_expire(fleet):
    engine, root = fleet
    with Session(engine) as session:
        first = issue_code(session, root, "cam-01", actor="test").code
        second = issue_code(session, root, "cam-01", actor="test").code
        with pytest.raises(UnknownCodeError, match="replaced by a newer one"):
            enroll(session, None, **_request(first))
        brief = issue_code(session, root, "cam-02", actor="test",
                           valid_for=timedelta(microseconds=1)).code
        with pytest.raises(ExpiredCodeError, match="expired at"):
            enroll(session, None, **_request(brief))
        assert enroll(session, None, **_request(second)).device_id == "cam-01"


def test_ids_the_fleet_keeps_for_itself_are_refused(fleet):
    engine, root = fleet
    with Session(engine) as session:
        for bad in ("edgefleet-fleet-w1", "edgefleet-admin", "-x", "a/b", "x" * 65, "a\x00"):
            with pytest.raises(InvalidRequestError):
                issue_code(session, root, bad, actor="test")
        assert list(session.exec(select(Device))) == []


def test_a_broker_that_cannot_make_the_account_leaves_the_code_unspent(fleet, tmp_path):
    engine, root = fleet
    nowhere = DynsecAccounts(BrokerAddress("127.0.0.1", free_port(), username="edgefleet-admin",
                                           password="x"), timeout_s=3)
    with Session(engine) as session:
        code = issue_code(session, root, "cam-01", actor="test").code
        with pytest.raises(UnavailableError, match="cannot reach the broker"):
            enroll(session, nowhere, **_request(code))
    with LocalBroker(tmp_path / "broker", accounts=True) as broker:
        accounts = DynsecAccounts(broker.admin_address())
        with Session(engine) as session:
            done = enroll(session, accounts, **_request(code))
            assert done.password is not None and len(done.password) == 32
            revoked = revoke(session, accounts, "cam-01", actor="test")
            assert revoked.broker_account_removed
            assert session.get(DeviceIdentity, "cam-01").revoked_at is not None
        wrong = DynsecAccounts(BrokerAddress("127.0.0.1", broker.port,
                                             username="edgefleet-admin", password="wrong"))
        with pytest.raises(Exception, match="refused the admin account"):
            wrong.add_device("cam-09")
