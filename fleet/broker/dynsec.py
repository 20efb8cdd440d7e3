"""Mosquitto 2's dynamic-security plugin, driven over its control topic.

Accounts change live (no signal, no reload, no file edited behind the broker's back): the
fleet connects as the store's admin account, publishes a JSON command list on
``$CONTROL/dynamic-security/v1`` and reads the answers on ``.../response``, each matched by
its ``correlationData``. Deleting a client also disconnects it, which is how a revoked
device is kicked within the same second.

The rights are the hardening work's (also in ``deploy/mosquitto/add-account.sh``): deny by
default; a device may publish only its own channels and read only its own desired state;
the fleet role reads every device channel, directly or through the ``$share/fleet`` group,
and publishes desired states (and empty retained messages to clear refused ones).

:func:`initial_store` makes a store file for a broker's first start: it holds the admin
account (its password hashed as the plugin does: PBKDF2-HMAC-SHA512, 101 rounds, a 12-byte
salt), the admin and fleet roles, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract import TOPIC_ROOT
from agent.mqtt import BrokerAddress
from fleet.broker.accounts import (
    BrokerAccountError,
    device_client_id,
    new_password,
    worker_account,
)

__all__ = ["ADMIN_ACCOUNT", "FLEET_ROLE", "DynsecAccounts", "hash_password", "initial_store"]

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ADMIN_ACCOUNT = "edgefleet-admin"
FLEET_ROLE = "edgefleet-fleet"
DEVICE_ROLE_PREFIX = "edgefleet-device-"
PBKDF2_ROUNDS = 101
_DEVICE_SENDS = ("status", "reported", "telemetry", "events", "drift")
_STREAMS = ("telemetry", "events", "drift")


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's stored form of ``password``: ``password``, ``salt``, ``iterations``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ROUNDS)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": PBKDF2_ROUNDS}


def fleet_role_acls() -> list[dict[str, Any]]:
    tree = TOPIC_ROOT
    acls = []
    for channel in ("status", "reported"):
        acls += [_acl("subscribePattern", f"{tree}/+/{channel}"),
                 _acl("unsubscribePattern", f"{tree}/+/{channel}")]
    for channel in _STREAMS:
        for topic in (f"$share/fleet/{tree}/+/{channel}", f"{tree}/+/{channel}"):
            acls += [_acl("subscribePattern", topic), _acl("unsubscribePattern", topic)]
    acls += [_acl("publishClientReceive", f"{tree}/+/{channel}") for channel in _DEVICE_SENDS]
    acls += [_acl("publishClientSend", f"{tree}/+/{channel}")
             for channel in ("desired", "status", "reported")]
    return acls


def device_role_acls(device_id: str) -> list[dict[str, Any]]:
    own = f"{TOPIC_ROOT}/{device_id}"
    return [
        _acl("publishClientReceive", f"{own}/desired"),
        _acl("subscribeLiteral", f"{own}/desired"),
        _acl("unsubscribeLiteral", f"{own}/desired"),
        *(_acl("publishClientSend", f"{own}/{channel}") for channel in _DEVICE_SENDS),
    ]


def initial_store(admin_password: str) -> dict[str, Any]:
    """A dynamic-security store for a broker's first start: admin account, admin and fleet
    roles, deny by default (the plugin reads it at start only)."""
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": False},
        "clients": [{"username": ADMIN_ACCOUNT, "clientid": ADMIN_ACCOUNT,
                     "textname": "edgefleet accounts", **hash_password(admin_password),
                     "roles": [{"rolename": ADMIN_ACCOUNT}]}],
        "groups": [],
        "roles": [
            {"rolename": ADMIN_ACCOUNT, "acls": [
                _acl("publishClientSend", CONTROL_TOPIC),
                _acl("publishClientReceive", RESPONSE_TOPIC),
                _acl("subscribeLiteral", RESPONSE_TOPIC),
                _acl("unsubscribeLiteral", RESPONSE_TOPIC)]},
            {"rolename": FLEET_ROLE, "acls": fleet_role_acls()},
        ],
    }


class DynsecAccounts:
    """:class:`fleet.broker.accounts.BrokerAccounts` on Mosquitto's dynamic security.

    ``admin`` is the admin account's broker URL. Its client id is bound to its user name
    (as ``add-account.sh --init`` makes it), so one admin session runs at a time: each
    command list connects, waits for every answer and disconnects, under a lock."""

    def __init__(self, admin: BrokerAddress, timeout_s: float = 10.0) -> None:
        if not admin.username or admin.password is None:
            raise ValueError("the broker admin URL needs the admin's user name and password")
        self.admin = admin
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"Mosquitto dynamic security at {self.admin}"

    # -- BrokerAccounts ---------------------------------------------------------------

    def add_device(self, device_id: str) -> str:
        password = new_password()
        role = f"{DEVICE_ROLE_PREFIX}{device_id}"
        self._ensure_role(role, device_role_acls(device_id))
        self._ensure_client(device_id, device_client_id(device_id), role, password)
        return password

    def add_devices(self, device_ids: list[str]) -> dict[str, str]:
        """Many new accounts in one exchange (a simulated fleet); an id that already has
        an account is re-keyed on its own. Returns each id's password."""
        passwords = {device_id: new_password() for device_id in device_ids}
        commands = []
        for device_id, password in passwords.items():
            role = f"{DEVICE_ROLE_PREFIX}{device_id}"
            commands += [
                {"command": "createRole", "rolename": role, "acls": device_role_acls(device_id)},
                {"command": "createClient", "username": device_id, "password": password,
                 "clientid": device_client_id(device_id), "roles": [{"rolename": role}]},
            ]
        answers = self.run(commands)
        for device_id, created in zip(passwords, answers[1::2], strict=True):
            if created.get("error") == "Client already exists":
                passwords[device_id] = self.add_device(device_id)
            else:
                self._check([created])
        return passwords

    def remove_device(self, device_id: str) -> bool:
        answers = self.run([
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": f"{DEVICE_ROLE_PREFIX}{device_id}"},
        ])
        client, _role = self._check(answers, tolerate=("Client not found", "Role not found"))
        return client is None

    def add_worker(self, worker_id: str) -> str:
        password = new_password()
        name = worker_account(worker_id)
        self._ensure_client(name, name, FLEET_ROLE, password)
        return password

    # -- commands -----------------------------------------------------------------------

    def _ensure_role(self, role: str, acls: list[dict[str, Any]]) -> None:
        answers = self.run([{"command": "createRole", "rolename": role, "acls": acls}])
        if self._check(answers, tolerate=("Role already exists",))[0] is not None:
            # An older role of the same name: make its rights exactly these.
            self._check(self.run([{"command": "deleteRole", "rolename": role}]))
            self._check(self.run([{"command": "createRole", "rolename": role, "acls": acls}]))

    def _ensure_client(self, username: str, client_id: str, role: str, password: str) -> None:
        create = {"command": "createClient", "username": username, "password": password,
                  "clientid": client_id, "roles": [{"rolename": role}]}
        if self._check(self.run([create]), tolerate=("Client already exists",))[0] is None:
            return
        # Re-keyed (a re-enrolled device, a restarted worker): made anew, so its client id
        # and role are exactly these; deleting it closes a connection of the old key.
        self._check(self.run([{"command": "deleteClient", "username": username}]),
                    tolerate=("Client not found",))
        self._check(self.run([create]))

    @staticmethod
    def _check(answers: list[dict[str, Any]], tolerate: tuple[str, ...] = ()) -> list[str | None]:
        """Each answer's tolerated error (or None); any other error raises."""
        seen: list[str | None] = []
        for answer in answers:
            error = answer.get("error")
            if error and error not in tolerate:
                raise BrokerAccountError(
                    f"the broker refused {answer.get('command')}: {error}")
            seen.append(error)
        return seen

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` as the admin; the answers in the same order."""
        for command in commands:
            command["correlationData"] = uuid.uuid4().hex
        wanted = {command["correlationData"] for command in commands}
        with self._lock:
            answers = self._exchange(json.dumps({"commands": commands}).encode(), wanted)
        return [answers[command["correlationData"]] for command in commands]

    def _exchange(self, payload: bytes, wanted: set[str]) -> dict[str, dict[str, Any]]:
        answers: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        done = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.admin.username or "",
                             protocol=paho.MQTTv5)
        client.username_pw_set(self.admin.username, self.admin.password)
        if self.admin.tls:
            client.tls_set()

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            if reason_code.is_failure:
                problems.append(f"the broker refused the admin account: {reason_code}")
                done.set()
                return
            client.subscribe(RESPONSE_TOPIC, qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties) -> None:
            if any(code.is_failure for code in reason_codes):
                problems.append(f"the broker refused {RESPONSE_TOPIC} to the admin account "
                                "(is the dynamic-security plugin loaded?)")
                done.set()
                return
            client.publish(CONTROL_TOPIC, payload, qos=1)

        def on_message(client, userdata, message) -> None:
            try:
                document = json.loads(message.payload)
            except ValueError:
                return
            for answer in document.get("responses", []) if isinstance(document, dict) else []:
                if isinstance(answer, dict) and answer.get("correlationData") in wanted:
                    answers[answer["correlationData"]] = answer
            if wanted <= answers.keys():
                done.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            client.connect(self.admin.host, self.admin.port, keepalive=30)
        except OSError as exc:
            raise BrokerAccountError(
                f"cannot reach the broker at {self.admin} to manage accounts: {exc}") from exc
        client.loop_start()
        try:
            answered = done.wait(self.timeout_s)
        finally:
            client.disconnect()
            client.loop_stop()
        if problems:
            raise BrokerAccountError(problems[0])
        if not answered:
            raise BrokerAccountError(
                f"the broker at {self.admin} did not answer the account commands within "
                f"{self.timeout_s:.0f} s")
        return answers
