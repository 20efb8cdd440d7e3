"""``edge-agent enroll``: join a fleet with an operator's one-time code.

With ``--code``: the fleet's root is downloaded and accepted only if its keys are the ones
the code names (so an impersonating fleet never sees the code's secret); the device makes
its own Ed25519 key pair (the private key stays in the state directory), sends the public
key signed together with the code, and keeps what the fleet answers: its device id and its
broker account. ``edge-agent run`` then needs nothing but the state directory.

``--trust-first-root`` is the older way, for a lab: the first root the URL serves is pinned
unchecked, no identity is made, and the broker is learnt from ``/api/v1/device-config``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import msgspec
import urllib3

from agent.enrollment import (
    EnrollmentCode,
    EnrollRequest,
    EnrollResponse,
    proof_message,
    root_fingerprint,
)
from agent.errors import TrustError
from agent.identity import Identity, device_key, public_key_pem

__all__ = ["EnrollError", "enroll_with_code", "main"]

_MAX_ANSWER_BYTES = 8192


class EnrollError(RuntimeError):
    """Enrollment did not happen; the message says why and what to do."""


def _post_enroll(fleet_url: str, request: EnrollRequest) -> EnrollResponse:
    from agent.trust.client import http_pool, read_capped

    url = f"{fleet_url}/api/v1/enroll"
    try:
        response = http_pool().request(
            "POST", url, body=msgspec.json.encode(request),
            headers={"Content-Type": "application/json"}, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise EnrollError(f"cannot reach {url}: {exc}") from exc
    body = read_capped(response, _MAX_ANSWER_BYTES)
    if body is None:
        raise EnrollError(f"{url}: answer larger than {_MAX_ANSWER_BYTES} bytes")
    if response.status != 200:
        try:
            problem = json.loads(body)
            detail = f"{problem.get('reason') or response.status}: {problem.get('detail')}"
        except (ValueError, AttributeError):
            detail = f"HTTP {response.status}"
        raise EnrollError(f"the fleet refused the enrollment: {detail}")
    try:
        return msgspec.json.decode(body, type=EnrollResponse)
    except msgspec.ValidationError as exc:
        raise EnrollError(f"{url}: not an enrollment answer: {exc}") from exc


def enroll_with_code(fleet_url: str, code: EnrollmentCode, state_dir: Path) -> Identity:
    """The whole enrollment; raises :class:`EnrollError` or ``TrustError`` before anything
    is stored, so a failed attempt leaves an earlier enrollment as it was."""
    from agent.contract import is_valid_device_id
    from agent.mqtt import BrokerAddress
    from agent.trust.client import fetch_root, pin_root

    raw_root, root = fetch_root(fleet_url)
    served = root_fingerprint(root)
    if served != code.fingerprint:
        raise TrustError(
            f"{fleet_url} serves a root whose keys are not the ones this code names "
            f"(served {base64.b32encode(served).decode()[:12]}…, code "
            f"{base64.b32encode(code.fingerprint).decode()[:12]}…): a fleet impersonator, "
            "or a code from another fleet; nothing was sent to it")
    key = device_key(state_dir, new=True)
    public = public_key_pem(key)
    signature = key.sign(proof_message(code.secret, public))
    answer = _post_enroll(fleet_url, EnrollRequest(
        secret=code.secret, public_key=public, proof=base64.b64encode(signature).decode()))
    if not is_valid_device_id(answer.device_id):
        raise EnrollError(f"the fleet named an invalid device id {answer.device_id[:80]!r}")
    if answer.broker is not None:
        try:
            address = BrokerAddress.parse(answer.broker)
        except ValueError as exc:
            raise EnrollError(f"the fleet named a broker this agent cannot use: {exc}") from None
        if address.username or address.password:
            raise EnrollError("the fleet named its broker with credentials in the URL")
    identity = Identity(device_id=answer.device_id, fleet_url=fleet_url,
                        broker=answer.broker, username=answer.username,
                        password=answer.password)
    pin_root(raw_root, state_dir / "tuf")
    identity.save(state_dir)
    return identity


def main(args: argparse.Namespace) -> int:
    from agent.state import AgentState
    from agent.trust.client import enroll as trust_first_root
    from agent.trust.client import fetch_device_broker

    fleet = args.fleet.rstrip("/")
    if not fleet.startswith(("http://", "https://")):
        print(f"error: --fleet {args.fleet!r}: expected http://HOST:PORT or https://…",
              file=sys.stderr)
        return 2
    if args.code is None and not args.trust_first_root:
        print("error: give --code CODE (from `edge-fleet devices add DEVICE` on the fleet), "
              "or --trust-first-root to pin whatever root the URL serves (a lab only)",
              file=sys.stderr)
        return 2
    code = None
    if args.code is not None:
        try:
            code = EnrollmentCode.parse(args.code)
        except ValueError as exc:
            print(f"error: --code: {exc}", file=sys.stderr)
            return 2
    if code is not None:
        # It will hold the device's private key and broker password.
        args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        args.state_dir.chmod(0o700)
    state = AgentState(args.state_dir)
    try:
        if state.fleet_url and not args.force:
            print(f"error: already enrolled with {state.fleet_url} (use --force to replace)",
                  file=sys.stderr)
            return 2
        if code is not None:
            identity = enroll_with_code(fleet, code, args.state_dir)
            state.put("fleet_url", fleet)
            state.put("device_id", identity.device_id)
            if identity.broker is not None:
                state.put("broker_url", identity.broker)
            else:
                state.delete("broker_url")
            account = (f" as {identity.username}" if identity.username
                       else " (the fleet gave no broker account: give run --broker)")
            print(f"enrolled {identity.device_id} with {fleet}: root keys checked against "
                  f"the code; broker {identity.broker or 'not named'}{account}")
            print(f"start it: edge-agent run --state-dir {args.state_dir}")
            return 0
        root = trust_first_root(fleet, args.state_dir / "tuf")
        state.put("fleet_url", fleet)
        try:
            broker = fetch_device_broker(fleet)
            problem = None
        except ValueError as exc:
            broker, problem = None, str(exc)
        if broker is not None:
            state.put("broker_url", broker)
        else:
            state.delete("broker_url")
    except (TrustError, EnrollError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        state.close()
    keyids = ", ".join(k[:12] for k in root.roles["root"].keyids)
    print(f"warning: trusted the first root {fleet} served (no code to check it against)",
          file=sys.stderr)
    print(f"enrolled with {fleet}: root v{root.version}, root keys {keyids}, "
          f"threshold {root.roles['root'].threshold}")
    if broker is not None:
        print(f"broker: {broker} (edge-agent run uses it unless given --broker)")
    else:
        print(f"warning: the fleet did not name its broker ({problem or 'it does not say'}): "
              "give edge-agent run --broker mqtt://HOST:PORT", file=sys.stderr)
    return 0
