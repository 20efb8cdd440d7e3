"""Broker accounts as the fleet sees them: one per device, one per fleet worker.

The fleet makes a device's account at enrollment and removes it at revocation; how is the
broker's business. :class:`BrokerAccounts` is what the rest of the fleet calls, so that a
broker other than Mosquitto (EMQX's or HiveMQ's authentication APIs) is one more class, not
a change in enrollment. :class:`fleet.broker.dynsec.DynsecAccounts` is Mosquitto's.

Names (shared with ``deploy/mosquitto/add-account.sh`` and the agent): a device's user name
is its id and its only client id ``edgefleet-agent-<id>``; a fleet worker's user name and
client id are ``edgefleet-fleet-<worker>``. Every account may connect with its own client id
only, so nobody can take over another's session.
"""

from __future__ import annotations

import secrets
from typing import Protocol

__all__ = [
    "DEVICE_CLIENT_PREFIX",
    "FLEET_ACCOUNT_PREFIX",
    "BrokerAccountError",
    "BrokerAccounts",
    "device_client_id",
    "new_password",
    "worker_account",
]

DEVICE_CLIENT_PREFIX = "edgefleet-agent-"
FLEET_ACCOUNT_PREFIX = "edgefleet-fleet-"


class BrokerAccountError(RuntimeError):
    """The broker refused an account change or did not answer (the message says which)."""


def device_client_id(device_id: str) -> str:
    return f"{DEVICE_CLIENT_PREFIX}{device_id}"


def worker_account(worker_id: str) -> str:
    return f"{FLEET_ACCOUNT_PREFIX}{worker_id}"


def new_password() -> str:
    """32 characters of A-Z a-z 0-9 (190 bits): safe in a URL and a shell without quoting."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(32))


class BrokerAccounts(Protocol):
    def add_device(self, device_id: str) -> str:
        """Create (or re-key) ``device_id``'s account; returns its new password."""

    def remove_device(self, device_id: str) -> bool:
        """Remove the account and end its live connection; False if there was none."""

    def add_worker(self, worker_id: str) -> str:
        """Create (or re-key) a fleet worker's account; returns its new password."""

    def describe(self) -> str:
        """Where accounts are kept, for logs (never a password)."""
