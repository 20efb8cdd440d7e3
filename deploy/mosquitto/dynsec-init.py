#!/usr/bin/env python3
"""Broker accounts for containers: what ``add-account.sh`` does on a host, without bash,
``mosquitto_ctrl`` or root on the broker's machine. The fleet image installs it as
``edgefleet-dynsec-init``; compose and the Kubernetes manifests run it as one-shot steps.

    edgefleet-dynsec-init store PATH [--owner UID:GID]
        Before the broker's first start: the dynamic-security store at PATH, deny by
        default, with the admin account ``edgefleet-admin`` (password: the environment's
        BROKER_ADMIN_PASSWORD) and the fleet role. A store already at PATH is left as it
        is: from its first start on, the broker owns the file (it reads it at start only
        and rewrites it after every account change).

    edgefleet-dynsec-init workers WORKER... [--admin-url URL]
        On the running broker: the account ``edgefleet-fleet-WORKER`` of each fleet worker
        (run with EDGEFLEET_WORKER_ID=WORKER), bound to the client id of the same name,
        with the password BROKER_WORKER_PASSWORD: made, or given that password again
        (which disconnects a connected worker once: it reconnects by itself and finds
        its session). Through the broker's $CONTROL topic as the admin (--admin-url,
        default the environment's EDGEFLEET_BROKER_ADMIN_URL, the fleet workers' too).

Every worker gets the same password, so that a worker's broker URL can be composed from
its name (a StatefulSet pod's, a compose service's) and one secret; each account still
connects with its own client id only. Passwords go into URLs as they are: 16 or more of
A-Z a-z 0-9 . _ ~ - (``openssl rand -hex 24`` makes one). They are read from the
environment only, never from the command line (``ps`` shows that to everyone).

Exit codes: 0 done (or nothing to do), 1 the broker refused or did not answer, 2 bad
arguments or environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

PASSWORD_RE = re.compile(r"[A-Za-z0-9._~-]{16,128}\Z")
WORKER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}\Z")


class UsageError(Exception):
    """Bad arguments or environment (exit 2)."""


def _password(variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        raise UsageError(f"{variable} is not set (the password comes from the environment)")
    if not PASSWORD_RE.match(value):
        raise UsageError(f"{variable} must be 16-128 of A-Z a-z 0-9 . _ ~ - (it goes into "
                         "broker URLs unescaped): `openssl rand -hex 24` makes one")
    return value


def make_store(path: Path, owner: str | None) -> str:
    from fleet.broker.dynsec import initial_store

    if path.exists():
        return f"account store {path} exists: left as it is (the broker owns it)"
    if not path.parent.is_dir():
        raise UsageError(f"no directory {path.parent} for the account store")
    uid = gid = None
    if owner is not None:
        match = re.fullmatch(r"(\d+):(\d+)", owner)
        if match is None:
            raise UsageError(f"--owner {owner}: expected UID:GID, e.g. 1883:1883")
        uid, gid = int(match[1]), int(match[2])
    document = json.dumps(initial_store(_password("BROKER_ADMIN_PASSWORD")), indent=2)
    handle, temporary = tempfile.mkstemp(prefix=".dynsec-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(document + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        if uid is not None and os.geteuid() == 0:
            os.chown(temporary, uid, gid)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return f"account store {path} made with the admin account (deny by default)"


def _refused(answers: list[dict]) -> None:
    for answer in answers:
        error = answer.get("error")
        if error:
            raise RuntimeError(f"the broker refused {answer.get('command')}: {error}")


def add_workers(workers: list[str], admin_url: str | None) -> list[str]:
    from agent.mqtt import BrokerAddress
    from fleet.broker.accounts import worker_account
    from fleet.broker.dynsec import FLEET_ROLE, DynsecAccounts

    for worker in workers:
        if not WORKER_RE.match(worker):
            raise UsageError(f"{worker!r} is not a worker id (1-48 of A-Z a-z 0-9 _ . -, "
                             "not starting with _ . -)")
    if not admin_url:
        raise UsageError("no admin URL: give --admin-url or set EDGEFLEET_BROKER_ADMIN_URL")
    password = _password("BROKER_WORKER_PASSWORD")
    try:
        accounts = DynsecAccounts(BrokerAddress.parse(admin_url))
    except ValueError as exc:
        raise UsageError(f"--admin-url: {exc}") from None
    said = []
    for worker in workers:
        name = worker_account(worker)
        created = accounts.run([{
            "command": "createClient", "username": name, "password": password,
            "clientid": name, "roles": [{"rolename": FLEET_ROLE}]}])
        if created[0].get("error") == "Client already exists":
            # Given the password again (a changed secret); bound to its own client id and
            # given the fleet role if it was made otherwise (a client id change would kick
            # a connected worker: only when needed).
            shown = accounts.run([{"command": "getClient", "username": name}])
            _refused(shown)
            client = shown[0].get("data", {}).get("client", {})
            commands = [{"command": "setClientPassword", "username": name,
                         "password": password}]
            if client.get("clientid") != name:
                commands.append({"command": "setClientId", "username": name, "clientid": name})
            if FLEET_ROLE not in {role.get("rolename") for role in client.get("roles", [])}:
                commands.append({"command": "addClientRole", "username": name,
                                 "rolename": FLEET_ROLE})
            _refused(accounts.run(commands))
            said.append(f"{name}: exists, password set again")
        else:
            _refused(created)
            said.append(f"{name}: made")
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgefleet-dynsec-init",
        description="Mosquitto dynamic-security accounts for an edgefleet broker in containers")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="the account store, before the first start")
    store.add_argument("path", type=Path)
    store.add_argument("--owner", help="UID:GID to give the file when run as root (1883:1883: "
                                       "the eclipse-mosquitto image's user)")
    workers = commands.add_parser("workers", help="fleet worker accounts, on the running broker")
    workers.add_argument("workers", nargs="+", metavar="WORKER")
    workers.add_argument("--admin-url", default=os.environ.get("EDGEFLEET_BROKER_ADMIN_URL"))
    args = parser.parse_args(argv)
    try:
        if args.command == "store":
            print(make_store(args.path, args.owner))
        else:
            for line in add_workers(args.workers, args.admin_url):
                print(line)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # BrokerAccountError and the like: said in one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
