"""Unpacking a bundle archive into a slot directory, refusing anything unsafe.

A bundle is an uncompressed tar whose first member is ``manifest.json`` and whose other
members are exactly the plain files the manifest lists, with their sizes and SHA-256.
The archive as a whole was already verified against its signed TUF target before it gets
here; these checks are the second wall, against a signed-but-malicious or buggy build:

* only regular files with plain names (no directories, no ``/``, no ``..``, nothing
  absolute, no symlinks or hard links, no devices), each listed once in the manifest;
* at most ``MAX_BUNDLE_FILES`` members and ``max_bytes`` in total, checked from the
  headers before a byte is written, and again while copying;
* every file is hashed while it is copied and compared with the manifest;
* files are created with ``O_EXCL | O_NOFOLLOW`` inside an empty directory and fsynced,
  and the slot is marked complete (``.complete``) only after all of that, so a crash
  mid-way leaves a slot that is never mistaken for a good one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import IO

from agent.contract import (
    MANIFEST_NAME,
    MAX_BUNDLE_FILES,
    MAX_MANIFEST_BYTES,
    BundleManifest,
    MessageRejected,
    decode,
    to_json,
)
from agent.errors import (
    BundleTooLargeError,
    LengthOrHashMismatchError,
    ManifestError,
    UnsafeArchiveError,
)
from agent.faults import crash_point

__all__ = [
    "COMPLETE_MARKER",
    "MAX_MANIFEST_BYTES",
    "extract_bundle",
    "fsync_dir",
    "read_manifest",
    "verify_slot",
]

COMPLETE_MARKER = ".complete"
_CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_manifest(data: bytes) -> BundleManifest:
    try:
        manifest = decode(BundleManifest, data)
    except MessageRejected as exc:
        raise ManifestError(f"manifest.json is not a valid bundle manifest: {exc}") from exc
    referenced = [manifest.model_file]
    if manifest.health_check is not None:
        referenced.append(manifest.health_check.file)
    if manifest.baseline_file is not None:
        referenced.append(manifest.baseline_file)
    for name in referenced:
        if name not in manifest.files:
            raise ManifestError(f"manifest names {name!r} but does not list it in files")
    if MANIFEST_NAME in manifest.files:
        raise ManifestError("manifest.json must not list itself")
    return manifest


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeArchiveError(f"absolute path in bundle: {name!r}")
    if ".." in Path(name).parts:
        raise UnsafeArchiveError(f"path escapes the bundle: {name!r}")
    if "/" in name.strip("/") or "\\" in name:
        raise UnsafeArchiveError(f"bundle members must be plain file names: {name!r}")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"link in bundle: {name!r} -> {member.linkname!r}")
    if not member.isfile():
        raise UnsafeArchiveError(f"not a regular file in bundle: {name!r}")


def _copy_hashing(source: IO[bytes], target: Path, limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise LengthOrHashMismatchError(f"{target.name}: longer than its listed size")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def extract_bundle(archive: Path, dest: Path, max_bytes: int) -> BundleManifest:
    """Unpack ``archive`` into the empty (or absent) directory ``dest``; return its manifest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            manifest = _extract_members(tar, dest, max_bytes)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"not a valid bundle archive: {exc}") from exc
    (dest / MANIFEST_NAME).write_bytes(to_json(manifest))
    (dest / COMPLETE_MARKER).write_text(manifest.target_name)
    for name in (MANIFEST_NAME, COMPLETE_MARKER):
        with open(dest / name, "rb") as written:
            os.fsync(written.fileno())
    fsync_dir(dest)
    return manifest


def _extract_members(tar: tarfile.TarFile, dest: Path, max_bytes: int) -> BundleManifest:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME:
        raise ManifestError(f"the first member of a bundle must be {MANIFEST_NAME}")
    _check_member(first)
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleTooLargeError(f"manifest.json is {first.size} bytes")
    handle = tar.extractfile(first)
    assert handle is not None
    manifest = _parse_manifest(handle.read())
    declared = sum(entry.size for entry in manifest.files.values())
    if declared > max_bytes:
        raise BundleTooLargeError(
            f"bundle declares {declared} bytes, over the {max_bytes}-byte limit"
        )

    seen: set[str] = set()
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_BUNDLE_FILES:
            raise UnsafeArchiveError(f"more than {MAX_BUNDLE_FILES} files in bundle")
        _check_member(member)
        entry = manifest.files.get(member.name)
        if entry is None:
            raise UnsafeArchiveError(f"file not listed in the manifest: {member.name!r}")
        if member.name in seen:
            raise UnsafeArchiveError(f"file appears twice in bundle: {member.name!r}")
        if member.size != entry.size:
            raise LengthOrHashMismatchError(
                f"{member.name}: {member.size} bytes, manifest says {entry.size}"
            )
        seen.add(member.name)
        source = tar.extractfile(member)
        assert source is not None
        sha256, size = _copy_hashing(source, dest / member.name, entry.size)
        crash_point("during_unpack")
        if size != entry.size or sha256 != entry.sha256:
            raise LengthOrHashMismatchError(
                f"{member.name}: sha256 {sha256[:16]}…, manifest says {entry.sha256[:16]}…"
            )
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise ManifestError(f"files listed in the manifest but missing: {missing}")
    return manifest


def read_manifest(slot: Path) -> BundleManifest:
    try:
        data = (slot / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise ManifestError(f"{slot}: no manifest: {exc}") from exc
    return _parse_manifest(data)


def verify_slot(slot: Path) -> BundleManifest:
    """Re-check an installed slot: complete, and every file still matches its hash."""
    if not (slot / COMPLETE_MARKER).is_file():
        raise ManifestError(f"{slot}: installation never completed")
    manifest = read_manifest(slot)
    for name, entry in manifest.files.items():
        digest = hashlib.sha256()
        size = 0
        try:
            with open(slot / name, "rb") as installed:
                while chunk := installed.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise LengthOrHashMismatchError(f"{slot / name}: {exc}") from exc
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise LengthOrHashMismatchError(f"{slot / name}: changed since it was installed")
    return manifest
