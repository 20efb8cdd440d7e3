"""What a device is, once enrolled: its id, its key pair and its broker account.

Kept in the state directory, readable only by the agent's user (0600 files, 0700 directory):

* ``device-key.pem``: the device's Ed25519 private key, made on the device at enrollment;
  it never leaves it (the fleet gets the public key only);
* ``identity.json``: the device id the fleet gave, the fleet's URL, the broker's address
  and the broker account's user name and password.

Why a file of its own and not ``agent.db``: a secret must be written once with the right
mode (a SQLite file and its WAL/shm companions take whatever the umask gives), and
``edge-agent doctor`` reads it without opening the daemon's database.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.private_file import write_private

__all__ = ["IDENTITY_FILE", "KEY_FILE", "Identity", "device_key", "public_key_pem"]

IDENTITY_FILE = "identity.json"
KEY_FILE = "device-key.pem"
_MAX_IDENTITY_BYTES = 16 * 1024


def device_key(state_dir: Path, *, new: bool = False) -> Ed25519PrivateKey:
    """The device's private key; made (and stored 0600) if there is none or ``new``."""
    path = state_dir / KEY_FILE
    if path.is_file() and not new:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key


def public_key_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Identity:
    device_id: str
    fleet_url: str
    broker: str | None = None  # mqtt://HOST:PORT, no credentials
    username: str | None = None
    password: str | None = None

    def broker_url(self) -> str | None:
        """The broker with this device's credentials (for the MQTT link), or None."""
        if self.broker is None:
            return None
        if self.username is None:
            return self.broker
        from agent.mqtt import BrokerAddress

        return BrokerAddress.parse(self.broker).with_account(self.username, self.password).url()

    def save(self, state_dir: Path) -> None:
        write_private(state_dir / IDENTITY_FILE, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, state_dir: Path) -> Identity | None:
        """None when the device was never enrolled with a code; ValueError when the file
        is there but unreadable as an identity (named)."""
        path = state_dir / IDENTITY_FILE
        if not path.is_file():
            return None
        raw = path.read_bytes()[: _MAX_IDENTITY_BYTES + 1]
        if len(raw) > _MAX_IDENTITY_BYTES:
            raise ValueError(f"{path}: larger than {_MAX_IDENTITY_BYTES} bytes")
        try:
            document = json.loads(raw)
            if not isinstance(document, dict):
                raise TypeError("not an object")
            fields = {name: document.get(name) for name in
                      ("device_id", "fleet_url", "broker", "username", "password")}
            if not isinstance(fields["device_id"], str) or not isinstance(
                    fields["fleet_url"], str):
                raise TypeError("device_id and fleet_url must be strings")
            for name in ("broker", "username", "password"):
                if fields[name] is not None and not isinstance(fields[name], str):
                    raise TypeError(f"{name} must be a string")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not an enrollment identity: {exc}") from None
        return cls(**fields)
