"""The fleet's TUF repository: keys, signed metadata, bundles as targets.

Layout under the data directory::

    keys/root/root-N.pem          offline root keys: move them off the server after init
    keys/online/ROLE.pem          online keys: targets, snapshot, timestamp, director
    repo/metadata/N.root.json     every root version (clients walk the chain), root.json = latest
    repo/metadata/N.targets.json  consistent snapshots: old versions stay for clients mid-update
    repo/metadata/N.snapshot.json
    repo/metadata/timestamp.json  written last, so it never points at a file not yet there
    repo/targets/SHA256.NAME      bundles, addressed by hash

The *director* key signs each device's desired state (see ``fleet.trust.director``). TUF
admits only its four top-level roles in root, so the director's keys and threshold ride in
root's signed body as ``x-edgefleet-director``: root delegates it, root rotation rotates it,
and an agent trusts it exactly as far as it trusts root.

Every change takes an exclusive file lock, so ``edge-fleet bundle publish`` can run while
``edge-fleet serve`` refreshes the timestamp.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.contract import DIRECTOR_FIELD, utcnow

__all__ = ["ONLINE_ROLES", "Expiry", "FleetRepository", "RepositoryConfigError"]

ONLINE_ROLES = ("targets", "snapshot", "timestamp", "director")
TUF_ROLES = ("root", "targets", "snapshot", "timestamp")


class RepositoryConfigError(RuntimeError):
    """The repository is missing, already exists, or a key is not where it must be."""


@dataclass(frozen=True)
class Expiry:
    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def for_role(self, role: str) -> timedelta:
        return getattr(self, role)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _write_key(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(signer.private_bytes)


def load_signer(path: Path) -> CryptoSigner:
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RepositoryConfigError(f"key file {path} not found") from None
    return CryptoSigner(private)


class FleetRepository:
    def __init__(self, data_dir: Path, expiry: Expiry | None = None) -> None:
        self.data_dir = data_dir
        self.keys_dir = data_dir / "keys"
        self.metadata_dir = data_dir / "repo" / "metadata"
        self.targets_dir = data_dir / "repo" / "targets"
        self.expiry = expiry or Expiry()
        self._serializer = JSONSerializer(compact=False)

    # ------------------------------------------------------------------ set-up

    @property
    def exists(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    def init(self, root_keys: int = 1, root_threshold: int = 1) -> None:
        """Create all keys and version 1 of every role."""
        if self.exists:
            raise RepositoryConfigError(f"a repository already exists in {self.data_dir}")
        if not 1 <= root_threshold <= root_keys:
            raise RepositoryConfigError("need 1 <= --root-threshold <= --root-keys")
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        now = utcnow()
        root = Root(expires=now + self.expiry.root, consistent_snapshot=True)
        root_signers = []
        for index in range(root_keys):
            signer = CryptoSigner.generate_ed25519()
            _write_key(self.keys_dir / "root" / f"root-{index + 1}.pem", signer)
            root.add_key(signer.public_key, "root")
            root_signers.append(signer)
        root.roles["root"].threshold = root_threshold
        for role in ONLINE_ROLES:
            signer = CryptoSigner.generate_ed25519()
            _write_key(self.keys_dir / "online" / f"{role}.pem", signer)
            if role == "director":
                self._set_director(root, [signer.public_key])
            else:
                root.add_key(signer.public_key, role)
        self._write_root(root, root_signers)
        targets = Targets(expires=now + self.expiry.targets)
        self._commit(targets=targets)

    def ensure(self) -> bool:
        """Create the repository unless it exists; True when this call created it. Under
        the repository's lock, so workers starting together on a shared store make one."""
        with self._locked():
            if self.exists:
                return False
            self.init()
            return True

    # ----------------------------------------------------------------- reading

    def _load(self, name: str) -> Metadata:
        return Metadata.from_file(str(self.metadata_dir / name))

    def root(self) -> Metadata[Root]:
        return self._load("root.json")

    def timestamp(self) -> Metadata[Timestamp]:
        return self._load("timestamp.json")

    def snapshot(self) -> Metadata[Snapshot]:
        return self._load(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json")

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return self._load(f"{version}.targets.json")

    def target_files(self) -> dict[str, TargetFile]:
        return dict(self.targets().signed.targets)

    # ----------------------------------------------------------------- signing

    def online_signer(self, role: str) -> CryptoSigner:
        return load_signer(self.keys_dir / "online" / f"{role}.pem")

    def root_signers(self, key_dir: Path | None = None) -> list[CryptoSigner]:
        directory = key_dir or self.keys_dir / "root"
        paths = sorted(directory.glob("root-*.pem"))
        if not paths:
            raise RepositoryConfigError(
                f"no root keys in {directory}: bring the offline root keys (--root-key-dir)"
            )
        return [load_signer(path) for path in paths]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "repo.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_root(self, root: Root, signers: list[Signer]) -> None:
        metadata = Metadata(root)
        for signer in signers:
            metadata.sign(signer, append=True)
        data = metadata.to_bytes(self._serializer)
        _atomic_write(self.metadata_dir / f"{root.version}.root.json", data)
        _atomic_write(self.metadata_dir / "root.json", data)

    def _commit(self, targets: Targets | None = None, bump_snapshot: bool = True) -> None:
        """Write new targets (optional), snapshot and timestamp, in that order."""
        now = utcnow()
        if targets is not None:
            metadata = Metadata(targets)
            metadata.sign(self.online_signer("targets"))
            _atomic_write(
                self.metadata_dir / f"{targets.version}.targets.json",
                metadata.to_bytes(self._serializer),
            )
        if bump_snapshot or targets is not None:
            if (self.metadata_dir / "timestamp.json").exists():
                snapshot = self.snapshot().signed
                snapshot.version += 1
            else:
                snapshot = Snapshot()
            if targets is not None:
                snapshot.meta["targets.json"] = MetaFile(version=targets.version)
            snapshot.expires = now + self.expiry.snapshot
            metadata = Metadata(snapshot)
            metadata.sign(self.online_signer("snapshot"))
            _atomic_write(
                self.metadata_dir / f"{snapshot.version}.snapshot.json",
                metadata.to_bytes(self._serializer),
            )
            snapshot_version = snapshot.version
        else:
            snapshot_version = self.timestamp().signed.snapshot_meta.version
        if (self.metadata_dir / "timestamp.json").exists():
            timestamp = self.timestamp().signed
            timestamp.version += 1
        else:
            timestamp = Timestamp()
        timestamp.snapshot_meta = MetaFile(version=snapshot_version)
        timestamp.expires = now + self.expiry.timestamp
        metadata = Metadata(timestamp)
        metadata.sign(self.online_signer("timestamp"))
        _atomic_write(self.metadata_dir / "timestamp.json", metadata.to_bytes(self._serializer))

    # ---------------------------------------------------------------- changing

    def publish(self, bundle: Path, target_name: str) -> TargetFile:
        """Add ``bundle`` as target ``target_name`` and re-sign targets/snapshot/timestamp."""
        with self._locked():
            self._require()
            target = TargetFile.from_file(target_name, str(bundle), ["sha256"])
            digest = target.hashes["sha256"]
            stored = self.targets_dir / f"{digest}.{target_name}"
            if not stored.exists():
                tmp = stored.with_name(f".{stored.name}.tmp")
                shutil.copyfile(bundle, tmp)
                with open(tmp, "rb") as copied:
                    os.fsync(copied.fileno())
                os.replace(tmp, stored)
            targets = self.targets().signed
            targets.targets[target_name] = target
            targets.version += 1
            targets.expires = utcnow() + self.expiry.targets
            self._commit(targets=targets)
            return target

    def refresh_expiring(self, now: datetime | None = None) -> list[str]:
        """Re-sign snapshot/timestamp when past half their lifetime; return what changed."""
        now = now or utcnow()
        with self._locked():
            self._require()
            bumped = []
            snapshot_due = self.snapshot().signed.expires - now < self.expiry.snapshot / 2
            timestamp_due = self.timestamp().signed.expires - now < self.expiry.timestamp / 2
            if snapshot_due:
                bumped.append("snapshot")
            if snapshot_due or timestamp_due:
                self._commit(bump_snapshot=snapshot_due)
                bumped.append("timestamp")
            return bumped

    def rotate(self, role: str, root_key_dir: Path | None = None) -> int:
        """Replace ``role``'s key(s); returns the new root version.

        Root rotation: the new root is signed by the old root keys (meeting the old
        threshold) and by the new ones, so clients can verify the chain step by step.
        """
        if role not in (*TUF_ROLES, "director"):
            raise RepositoryConfigError(f"unknown role {role!r}")
        with self._locked():
            self._require()
            old_root_signers = self.root_signers(root_key_dir)
            root = self.root().signed
            root.version += 1
            root.expires = utcnow() + self.expiry.root
            signers: list[Signer] = list(old_root_signers)
            if role == "root":
                new_dir = self.keys_dir / f"root-v{root.version}"
                for keyid in list(root.roles["root"].keyids):
                    root.revoke_key(keyid, "root")
                for index in range(len(old_root_signers)):
                    signer = CryptoSigner.generate_ed25519()
                    _write_key(new_dir / f"root-{index + 1}.pem", signer)
                    root.add_key(signer.public_key, "root")
                    signers.append(signer)
                root_dir = root_key_dir or self.keys_dir / "root"
                retired = self.keys_dir / f"root-retired-v{root.version - 1}"
                if root_dir == self.keys_dir / "root":
                    os.replace(root_dir, retired)
                    os.replace(new_dir, root_dir)
            else:
                signer = CryptoSigner.generate_ed25519()
                key_path = self.keys_dir / "online" / f"{role}.pem"
                if role == "director":
                    self._set_director(root, [signer.public_key])
                else:
                    for keyid in list(root.roles[role].keyids):
                        root.revoke_key(keyid, role)
                    root.add_key(signer.public_key, role)
                os.replace(key_path, key_path.with_suffix(f".retired-v{root.version - 1}"))
                _write_key(key_path, signer)
            self._write_root(root, signers)
            if role in ("targets", "snapshot", "timestamp"):
                # Re-sign everything below root with the new key right away.
                targets = self.targets().signed
                targets.version += 1
                self._commit(targets=targets)
            return root.version

    def write_root(self, root: Root, signers: list[Signer]) -> None:
        """Write a root version signed by exactly ``signers`` (tools and attack tests)."""
        with self._locked():
            self._write_root(root, signers)

    @staticmethod
    def _set_director(root: Root, keys: list) -> None:
        root.unrecognized_fields[DIRECTOR_FIELD] = {
            "keys": {key.keyid: key.to_dict() for key in keys},
            "threshold": 1,
        }

    def _require(self) -> None:
        if not self.exists:
            raise RepositoryConfigError(
                f"no repository in {self.data_dir}: run `edge-fleet keys init` first"
            )
