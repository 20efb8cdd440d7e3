"""Bundle registry: publishing a built bundle into the TUF repository and the database.

The TUF targets metadata is the authority devices trust; the ``bundle`` table is the
operator's index of it (search, display, deploy by name and version). Publishing writes
the repository first: a row never names a bundle devices could not fetch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlmodel import Session, select

from agent.contract import (
    MAX_BASELINE_BYTES,
    MAX_MANIFEST_BYTES,
    Baseline,
    BundleManifest,
    MessageRejected,
    convert,
    decode,
    to_data,
)
from fleet.bundle_build import BuildError, manifest_json, member_bytes
from fleet.models import Bundle, BundleBaseline
from fleet.trust.repository import FleetRepository

__all__ = ["BundleExistsError", "find_baseline", "find_bundle", "list_bundles", "publish_bundle"]


class BundleExistsError(ValueError):
    pass


def publish_bundle(session: Session, repository: FleetRepository, path: Path) -> Bundle:
    if path.stat().st_size < 512:
        raise BuildError(f"{path}: too small to be a bundle")
    try:
        manifest = convert(BundleManifest, manifest_json(path, MAX_MANIFEST_BYTES))
    except ValueError as exc:  # MessageRejected, or BuildError from reading the archive
        raise BuildError(f"{path}: not a valid bundle: {exc}") from exc
    existing = find_bundle(session, manifest.name, manifest.version)
    baseline = _baseline_of(path, manifest)
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1024 * 1024):
            digest.update(chunk)
    if existing is not None:
        if existing.sha256 == digest.hexdigest():
            return existing  # publishing the same bytes twice is a no-op
        raise BundleExistsError(
            f"{manifest.name} v{manifest.version} is already published with other content; "
            "versions are immutable: build a new version"
        )
    target = repository.publish(path, manifest.target_name)
    row = Bundle(
        name=manifest.name,
        version=manifest.version,
        target_name=manifest.target_name,
        sha256=target.hashes["sha256"],
        size=target.length,
        runtime=manifest.runtime,
        manifest=to_data(manifest),
    )
    session.add(row)
    if baseline is not None:
        session.add(BundleBaseline(name=manifest.name, version=manifest.version,
                                   baseline=to_data(baseline)))
    session.commit()
    session.refresh(row)
    return row


def _baseline_of(path: Path, manifest: BundleManifest) -> Baseline | None:
    """The bundle's training baseline, which the fleet keeps to judge drift windows; a
    baseline devices would refuse is refused here too, before anything is published."""
    if manifest.baseline_file is None:
        return None
    data = member_bytes(path, manifest.baseline_file, MAX_BASELINE_BYTES)
    try:
        return decode(Baseline, data)
    except MessageRejected as exc:
        raise BuildError(f"{path}: {manifest.baseline_file} is not a valid baseline: "
                         f"{exc.detail}") from exc


def find_baseline(session: Session, name: str, version: int) -> Baseline | None:
    row = session.exec(select(BundleBaseline).where(
        BundleBaseline.name == name, BundleBaseline.version == version)).first()
    return convert(Baseline, row.baseline) if row is not None else None


def find_bundle(session: Session, name: str, version: int) -> Bundle | None:
    return session.exec(
        select(Bundle).where(Bundle.name == name, Bundle.version == version)
    ).first()


def list_bundles(session: Session) -> list[Bundle]:
    return list(session.exec(select(Bundle).order_by(Bundle.name, Bundle.version)))
