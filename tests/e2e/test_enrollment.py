"""Enrollment with one-time codes and broker accounts made by the fleet, across real
processes: ``edge-fleet serve`` (its own broker with accounts, or the production Mosquitto
of the fixtures driven through ``EDGEFLEET_BROKER_ADMIN_URL``), ``edge-agent enroll`` and
``run``, raw MQTT clients for what an attacker would try. No mocks.

Each test runs on the database its set-up has in the field: the embedded broker's on
SQLite (one box), the production broker's on PostgreSQL. The enrollment rules themselves
(codes claimed once under a race, expiry, proofs) run on both in
``tests/fleet/test_enrollment_rules.py``."""

from __future__ import annotations

import hashlib
import re
import stat
import subprocess
import time
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization

from agent.identity import Identity
from agent.mqtt import BrokerAddress, try_connect
from tests.fixtures.processes import console_script, start_fleet
from tests.fixtures.waiting import wait_until

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ON_POSTGRES = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


def _enroll(fleet_url: str, code: str, state_dir, *more: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*console_script("edge-agent"), "enroll", "--fleet", fleet_url, "--code", code,
         "--state-dir", str(state_dir), *more],
        capture_output=True, text=True, timeout=60, check=False)


def _connack(port: int, client_id: str, user: str | None = None,
             password: str | None = None) -> str:
    """The broker's answer to one CONNECT, as paho names it."""
    return try_connect(BrokerAddress("127.0.0.1", port, username=user, password=password),
                       client_id, timeout=15)


@ON_SQLITE
def test_a_code_is_spent_once_expires_and_is_never_shown_to_an_impersonator(
    tmp_path, database_url
):
    fleet = start_fleet(tmp_path, None, database_url)
    impostor = start_fleet(tmp_path, None, f"sqlite:///{tmp_path / 'impostor.db'}",
                           name="impostor")
    try:
        code = fleet.add_device("cam-01", tags={"site": "berlin"})
        # The impostor serves a valid, self-signed root of its own: refused before the
        # code's secret is sent, and the code stays good for the real fleet.
        fooled = _enroll(impostor.url, code, tmp_path / "fooled")
        assert fooled.returncode == 1, fooled.stdout
        assert "not the ones this code names" in fooled.stderr
        assert "a fleet impersonator" in fooled.stderr and "nothing was sent" in fooled.stderr
        assert "/api/v1/enroll" not in impostor.log()
        assert not (tmp_path / "fooled" / "identity.json").exists()

        state_dir = tmp_path / "cam-01"
        done = _enroll(fleet.url, code, state_dir)
        assert done.returncode == 0, done.stderr
        assert "enrolled cam-01 with" in done.stdout
        # The secrets are the agent's user's alone; the private key never left the device:
        # the fleet recorded the digest of the public key derived from it.
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for name in ("identity.json", "device-key.pem"):
            assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
        identity = Identity.load(state_dir)
        assert identity is not None and identity.device_id == "cam-01"
        assert identity.username == "cam-01" and len(identity.password or "") == 32
        key = serialization.load_pem_private_key((state_dir / "device-key.pem").read_bytes(),
                                                 password=None)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        entry = next(e for e in fleet.client().get("/api/v1/audit").json()
                     if e["action"] == "device.enroll")
        assert entry["details"]["key_sha256"] == hashlib.sha256(public).hexdigest()
        assert (fleet.device("cam-01") or {})["tags"] == {"site": "berlin"}

        again = _enroll(fleet.url, code, tmp_path / "thief")
        assert again.returncode == 1
        assert "enrollment_code_used" in again.stderr

        short = fleet.client().post("/api/v1/devices", json={"id": "cam-02",
                                                             "expires_in_s": 1})
        assert short.status_code == 201, short.text
        expires_at = datetime.fromisoformat(short.json()["expires_at"])
        wait_until(lambda: datetime.now(UTC) > expires_at, timeout=10, what="code expiry")
        late = _enroll(fleet.url, short.json()["code"], tmp_path / "cam-02")
        assert late.returncode == 1 and "enrollment_code_expired" in late.stderr

        forged = _enroll(fleet.url, code[:4] + ("A" if code[4] != "A" else "B") + code[5:],
                         tmp_path / "forged")
        assert forged.returncode == 1 and "enrollment_code_unknown" in forged.stderr
    finally:
        impostor.terminate()
        fleet.terminate()
    assert "Traceback" not in fleet.log()


@ON_SQLITE
def test_the_embedded_broker_refuses_strangers_and_borrowed_names_and_shuts_out_the_revoked(
    tmp_path, agents, database_url
):
    fleet = start_fleet(tmp_path, None, database_url)  # its own broker, accounts only
    try:
        port = int((fleet.data_dir / "broker-port").read_text())
        agents.enroll_with_code("cam-01", fleet)
        agents.enroll_with_code("cam-02", fleet)
        cam_02 = Identity.load(agents.state_dir("cam-02"))
        assert cam_02 is not None
        agent = agents.start("cam-01", None)
        wait_until(lambda: (fleet.device("cam-01") or {}).get("online"), timeout=30,
                   what="cam-01 online with the account it enrolled for")

        assert _connack(port, "anyone") == "Not authorized"
        # cam-02's own account, but cam-01's client id: it would take over cam-01's session.
        assert _connack(port, "edgefleet-agent-cam-01", "cam-02", cam_02.password) == (
            "Not authorized")
        assert _connack(port, "edgefleet-agent-cam-01", "cam-01", cam_02.password) == (
            "Not authorized")
        assert _connack(port, "edgefleet-fleet-x", "cam-02", cam_02.password) == (
            "Not authorized")
        assert (fleet.device("cam-01") or {}).get("online"), "cam-01 kept its connection"

        revoked_at = time.monotonic()
        done = fleet.cli("devices", "revoke", "cam-01")
        assert done.returncode == 0, done.stderr
        assert "broker account removed and its connection closed" in done.stdout
        audit = fleet.client().get("/api/v1/audit").json()
        assert [e["action"] for e in audit if e["subject"] == "device:cam-01"] == [
            "device.code", "device.enroll", "device.revoke"]
        wait_until(lambda: "(Administrative action)" in agent.log(), timeout=10,
                   what="cam-01's connection closed by the broker")
        closed_in = time.monotonic() - revoked_at
        assert fleet.device("cam-01")["online"] is False
        wait_until(lambda: re.search(r"refused the connection: Not authorized", agent.log()),
                   timeout=30, what="cam-01's reconnection refused")
        print(f"revoked device disconnected {closed_in:.2f} s after the revoke command")
        assert fleet.device("cam-01")["online"] is False

        # Re-flashed or forgiven: a new code brings it back, under a new key.
        agent.terminate()
        renewed = _enroll(fleet.url, fleet.add_device("cam-01"), agents.state_dir("cam-01"),
                          "--force")
        assert renewed.returncode == 0, renewed.stderr
        agents.start("cam-01", None)
        wait_until(lambda: (fleet.device("cam-01") or {}).get("online"), timeout=30,
                   what="cam-01 back online after enrolling again")
    finally:
        fleet.terminate()
    assert "Traceback" not in fleet.log()


@ON_POSTGRES
def test_a_fleet_given_the_brokers_admin_makes_device_accounts_on_the_production_broker(
    tmp_path, mosquitto, agents, database_url
):
    """The production Mosquitto set-up (``deploy/mosquitto``, store made by
    ``add-account.sh --init``), driven by the fleet as its admin."""
    from tests.fixtures.broker import FLEET_ACCOUNT

    admin = mosquitto.admin_address()
    fleet = start_fleet(
        tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url,
        extra_env={"EDGEFLEET_BROKER_ADMIN_URL":
                   f"mqtt://{admin.username}:{admin.password}@127.0.0.1:{mosquitto.port}"})
    try:
        assert "broker accounts: made by this fleet" in fleet.log()
        out = agents.enroll_with_code("edge-7", fleet)
        assert f"broker mqtt://127.0.0.1:{mosquitto.port} as edge-7" in out
        agents.start("edge-7", None)
        wait_until(lambda: (fleet.device("edge-7") or {}).get("online"), timeout=30,
                   what="edge-7 online on the production broker with its fleet-made account")
        assert fleet.cli("devices", "revoke", "edge-7").returncode == 0
        identity = Identity.load(agents.state_dir("edge-7"))
        assert identity is not None
        assert _connack(mosquitto.port, "edgefleet-agent-edge-7", "edge-7",
                        identity.password) == "Not authorized"
    finally:
        fleet.terminate()
