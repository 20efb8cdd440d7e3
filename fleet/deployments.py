"""Assigning a bundle to devices: allocate a generation, sign, store, publish (retained).

The generation is allocated under a row lock and committed before anything is published,
so two operators deploying at once still give each device strictly increasing
generations, and a crash between commit and publish at worst leaves a desired state
unpublished (deploy again), never a generation used twice. Staged rollouts reuse
:func:`assign`. The deployment's audit entry commits in the same transaction as the
generations it records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from sqlalchemy import update
from sqlmodel import Session, select

from agent.contract import BundleRef, Channel, DesiredState, is_valid_device_id, topic, utcnow
from fleet import audit
from fleet.db import dialect_insert
from fleet.errors import InvalidRequestError, UnknownBundleError, UnknownDevicesError
from fleet.models import Device, DeviceDesired
from fleet.registry import find_bundle
from fleet.trust.director import sign_desired

__all__ = ["DeploymentError", "Publisher", "assign", "mark_published"]

log = logging.getLogger(__name__)

Publisher = Callable[[str, bytes], None]  # (topic, payload) -> published retained, QoS 1


class DeploymentError(InvalidRequestError):
    """The deployment request is invalid; nothing was signed or published."""

    reason = "invalid_deployment"


def _locked_rows(session: Session, device_ids: list[str]) -> dict[str, DeviceDesired]:
    """Each device's desired-state row, created if new and locked for this transaction, in
    id order (two deployments never wait on each other in a cycle). In chunks: one insert
    and one locking select per thousand devices, not two statements per device."""
    insert = dialect_insert(session)
    now = utcnow()
    rows: dict[str, DeviceDesired] = {}
    for start in range(0, len(device_ids), 1000):
        chunk = device_ids[start:start + 1000]
        session.execute(
            insert(DeviceDesired).on_conflict_do_nothing(),
            [{"device_id": d, "generation": 0, "issued_at": now, "issued_by": ""}
             for d in chunk],
        )
        query = (select(DeviceDesired)
                 .where(DeviceDesired.device_id.in_(chunk))  # type: ignore[attr-defined]
                 .order_by(DeviceDesired.device_id).with_for_update())
        rows.update((row.device_id, row) for row in session.exec(query))
    return rows


def mark_published(session: Session, device_ids: list[str], now=None) -> None:
    """Count a (re)publication of these devices' stored desired states."""
    now = now or utcnow()
    for start in range(0, len(device_ids), 1000):
        chunk = device_ids[start:start + 1000]
        session.execute(
            update(DeviceDesired)
            .where(DeviceDesired.device_id.in_(chunk))  # type: ignore[attr-defined]
            .values(publish_count=DeviceDesired.publish_count + 1, published_at=now)
        )
    session.commit()


def _known(session: Session, device_ids: list[str]) -> set[str]:
    known: set[str] = set()
    unique = sorted(set(device_ids))
    for start in range(0, len(unique), 1000):  # bounded IN lists
        chunk = unique[start:start + 1000]
        known.update(session.exec(select(Device.id).where(Device.id.in_(chunk))))  # type: ignore[attr-defined]
    return known


def assign(
    session: Session,
    signer,
    publish: Publisher,
    bundle: BundleRef,
    device_ids: list[str],
    issued_by: str,
    allow_unknown: bool = False,
    reason: str | None = None,
) -> dict[str, int]:
    """Point ``device_ids`` at ``bundle``; returns each device's new generation.

    ``issued_by`` is the audit actor (``token:3:alice``, ``system:controller``); the
    entry (action ``deploy``) names the bundle, the devices and their generations.

    Devices the registry does not know are refused (all of them named) unless
    ``allow_unknown``: a mistyped id would otherwise be "deployed" to nobody, successfully.
    """
    bad = [d for d in device_ids if not is_valid_device_id(d)]
    if bad:
        raise DeploymentError(f"invalid device ids: {bad[:5]}")
    if find_bundle(session, bundle.name, bundle.version) is None:
        raise UnknownBundleError(f"no published bundle {bundle.name} v{bundle.version}")
    if not allow_unknown:
        unknown = sorted(set(device_ids) - _known(session, device_ids))
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more"
                                               if len(unknown) > 20 else "")
            raise UnknownDevicesError(
                f"unknown devices: {shown} (never seen by this fleet; deploy with "
                "allow_unknown / --allow-unknown to pre-provision them)"
            )
    signed: dict[str, tuple[int, bytes]] = {}
    audit.lock_chain(session)  # the chain before the rows, as every audited change does
    ordered = sorted(set(device_ids))  # a fixed order: no deadlocks between deploys
    locked = _locked_rows(session, ordered)
    for device_id in ordered:
        row = locked[device_id]
        row.generation += 1
        row.bundle_name, row.bundle_version = bundle.name, bundle.version
        row.issued_at, row.issued_by = utcnow(), issued_by
        desired = DesiredState(
            device_id=device_id, generation=row.generation, bundle=bundle,
            issued_at=row.issued_at,
        )
        signed[device_id] = (row.generation, sign_desired(desired, signer))
        row.payload = signed[device_id][1].decode()
        row.publish_count, row.published_at = 0, None
    generations = {device_id: generation for device_id, (generation, _) in signed.items()}
    audit.record(
        session, issued_by, "deploy", f"bundle:{bundle.name}:{bundle.version}",
        reason or f"{bundle.name} v{bundle.version} to {len(generations)} device(s)",
        _deploy_details(bundle, generations, allow_unknown),
    )
    session.commit()
    for device_id, (_, payload) in signed.items():
        publish(topic(device_id, Channel.DESIRED), payload)
    mark_published(session, list(signed))
    log.info("deployed %s v%d to %d device(s) by %s", bundle.name, bundle.version,
             len(signed), issued_by)
    return generations


# Device ids and generations named in a deployment's audit entry; beyond that, the count
# and a digest of the whole mapping (the entry stays small whatever the fleet's size).
AUDIT_DEVICES_SHOWN = 200


def _deploy_details(bundle: BundleRef, generations: dict[str, int], allow_unknown: bool
                    ) -> dict:
    shown = dict(list(generations.items())[:AUDIT_DEVICES_SHOWN])
    details: dict = {"bundle": bundle.name, "version": bundle.version,
                     "device_count": len(generations), "generations": shown,
                     "allow_unknown": allow_unknown}
    if len(shown) < len(generations):
        details["generations_sha256"] = hashlib.sha256(json.dumps(
            generations, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return details
