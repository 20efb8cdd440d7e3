"""The fleet's TUF repository: keys, signed metadata, bundles as targets.

Layout under the data directory (or ``EDGEFLEET_STORE_DIR``)::

    keys/root/root-N.pem          offline root keys: move them off the server after init
    keys/online/ROLE.pem          online keys: targets, snapshot, timestamp, director
    repo/metadata/N.root.json     every root version (clients walk the chain), root.json = latest
    repo/metadata/N.targets.json  consistent snapshots: old versions stay for clients mid-update
    repo/metadata/N.snapshot.json
    repo/metadata/timestamp.json  written last, so it never points at a file not yet there
    repo/targets/SHA256.NAME      bundles, addressed by hash

``repo/`` is a :class:`~fleet.trust.storage.Storage`: that directory, or a bucket
(``EDGEFLEET_STORE_URL=s3://BUCKET/PREFIX``: ``PREFIX/metadata/...``, ``PREFIX/targets/...``;
see :func:`open_repository`). The keys always stay on the worker's disk, never in a bucket:
every worker that signs needs the same ``keys/online`` (in Kubernetes, a Secret volume), and
the root keys belong offline.

The *director* key signs each device's desired state (see ``fleet.trust.director``). TUF
admits only its four top-level roles in root, so the director's keys and threshold ride in
root's signed body as ``x-edgefleet-director``: root delegates it, root rotation rotates it,
and an agent trusts it exactly as far as it trusts root.

Every change (publish, re-sign, rotate) reads the newest metadata and writes the next
versions under one exclusive lock, so two writers never both make version N+1:
``edge-fleet bundle publish`` can run while ``edge-fleet serve`` refreshes the timestamp.
The lock is a file lock (``repo.lock``) beside the keys; workers on several hosts sharing a
bucket take a PostgreSQL advisory lock instead (:func:`repository_lock`), which the server
frees when a holder's session ends, a killed worker's included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

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
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.contract import DIRECTOR_FIELD, utcnow
from fleet.trust.storage import (
    LocalStorage,
    ObjectCorruptError,
    RepositoryConfigError,
    S3Storage,
    Storage,
    StoreBusyError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from fleet.settings import Settings

__all__ = [
    "MAX_METADATA_BYTES",
    "ONLINE_ROLES",
    "REPOSITORY_LOCK_KEY",
    "Expiry",
    "FleetRepository",
    "LockFactory",
    "RepositoryConfigError",
    "file_lock",
    "open_repository",
    "repository_lock",
]

ONLINE_ROLES = ("targets", "snapshot", "timestamp", "director")
TUF_ROLES = ("root", "targets", "snapshot", "timestamp")
# The fleet reads no metadata file larger than this (an agent takes targets up to 5 MB).
MAX_METADATA_BYTES = 16 * 1024 * 1024
# The PostgreSQL advisory lock key of the repository's writers ("efrepolk"); distinct from
# the leader's, the rollout controller's and the schema migration's.
REPOSITORY_LOCK_KEY = 0x6566_7265_706F_6C6B & 0x7FFF_FFFF_FFFF_FFFF
REPOSITORY_LOCK_WAIT_S = 120.0

# Makes a fresh hold of the repository's lock each time it is called.
LockFactory = Callable[[], AbstractContextManager[None]]


@dataclass(frozen=True)
class Expiry:
    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def for_role(self, role: str) -> timedelta:
        return getattr(self, role)


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


def file_lock(path: Path) -> LockFactory:
    """An exclusive ``flock`` on ``path``: every process on this host (and on a shared
    file system that honours flock) that opens the same file."""

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    return hold


def repository_lock(engine: Engine, wait_s: float = REPOSITORY_LOCK_WAIT_S) -> LockFactory:
    """The repository's lock across hosts: a PostgreSQL session advisory lock on a
    connection of its own, held for one change. A holder that dies ends its session, which
    frees the lock. Waiting longer than ``wait_s`` is :class:`StoreBusyError`."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    key = {"key": REPOSITORY_LOCK_KEY}

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        try:
            connection = engine.connect()
        except DBAPIError as exc:
            raise StoreUnavailableError(f"the repository's lock: database unreachable "
                                        f"({exc.__class__.__name__})") from exc
        try:
            try:
                # SET LOCAL: the wait limit ends with this transaction, not the pooled session.
                connection.execute(text(f"SET LOCAL lock_timeout = {int(wait_s * 1000)}"))
                connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
                connection.commit()
            except DBAPIError as exc:
                connection.rollback()
                if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                    raise StoreBusyError(f"another worker held the repository's lock over "
                                         f"{wait_s:g} s") from exc
                raise StoreUnavailableError(f"the repository's lock: {exc.orig}") from exc
            try:
                yield
            finally:
                try:
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
                    connection.commit()
                except DBAPIError:
                    connection.invalidate()  # the server frees a closed session's locks
        finally:
            connection.close()

    return hold


def open_repository(settings: Settings, engine: Engine | None = None,
                    expiry: Expiry | None = None) -> FleetRepository:
    """The fleet's repository as the settings place it.

    Keys: ``EDGEFLEET_STORE_DIR`` (else the data directory), ``keys/``, always on this
    worker's disk. Metadata and bundles: ``repo/`` beside them, or the bucket of
    ``EDGEFLEET_STORE_URL`` (boto3 imported only then). With a bucket and a PostgreSQL
    database, changes take the database's advisory lock (``engine``, else one made from the
    settings), since the workers sharing the bucket may be on other hosts; otherwise the
    file lock ``repo.lock`` beside the keys.
    """
    data_dir = settings.repository_dir
    if not settings.store_url:
        return FleetRepository(data_dir, expiry)
    storage = S3Storage.from_url(settings.store_url, settings.s3_endpoint_url)
    lock = None
    if engine is None and settings.resolved_database_url.startswith("postgresql"):
        from fleet.db import make_engine

        engine = make_engine(settings.resolved_database_url)
    if engine is not None and engine.dialect.name == "postgresql":
        lock = repository_lock(engine)
    return FleetRepository(data_dir, expiry, storage=storage, lock=lock)


class FleetRepository:
    """Signs and stores the fleet's TUF repository.

    ``storage``: where metadata and bundles go (default: ``data_dir/repo``); ``lock``: what
    each change holds (default: ``flock`` on ``data_dir/repo.lock``).
    """

    def __init__(
        self,
        data_dir: Path,
        expiry: Expiry | None = None,
        *,
        storage: Storage | None = None,
        lock: LockFactory | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.keys_dir = data_dir / "keys"
        self.storage = storage or LocalStorage(data_dir / "repo")
        self.expiry = expiry or Expiry()
        self._lock = lock or file_lock(data_dir / "repo.lock")
        self._serializer = JSONSerializer(compact=False)

    @property
    def location(self) -> str:
        """Where the metadata and bundles are: a directory, or ``s3://BUCKET/PREFIX``."""
        return self.storage.location

    @property
    def _place(self) -> Path | str:
        """The repository, in messages: its data directory, or its bucket."""
        return self.data_dir if isinstance(self.storage, LocalStorage) else self.location

    @property
    def metadata_dir(self) -> Path:
        """The metadata directory (a bucket's: its URL, a str, for messages only)."""
        return self.storage.folder_location("metadata")  # type: ignore[return-value]

    @property
    def targets_dir(self) -> Path:
        """The bundles' directory (a bucket's: its URL, a str, for messages only)."""
        return self.storage.folder_location("targets")  # type: ignore[return-value]

    # ------------------------------------------------------------------ set-up

    @property
    def exists(self) -> bool:
        return self.storage.exists("metadata/timestamp.json")

    def init(self, root_keys: int = 1, root_threshold: int = 1) -> None:
        """Create all keys and version 1 of every role."""
        if self.exists:
            raise RepositoryConfigError(f"a repository already exists in {self._place}")
        if not 1 <= root_threshold <= root_keys:
            raise RepositoryConfigError("need 1 <= --root-threshold <= --root-keys")
        # The store answers a listing before any key is made (a missing bucket, refused
        # credentials: said now, with nothing left behind).
        self.storage.list("metadata")
        leftover = [self.keys_dir / "root", self.keys_dir / "online"]
        if any(directory.is_dir() and any(directory.iterdir()) for directory in leftover):
            # Keys without a repository: another store's (a mistyped EDGEFLEET_STORE_URL?)
            # or an interrupted init. Never overwritten: they may sign a repository elsewhere.
            raise RepositoryConfigError(
                f"{self.keys_dir} holds keys but {self._place} has no repository: check the "
                f"store's address, or move {self.keys_dir} away to start a new repository")
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
        the repository's lock, so workers starting together on a shared store make one.

        A repository made by another worker must come with its online keys here too (a
        bucket holds no keys): without them this worker could not sign, so it says so now
        rather than at its first deployment."""
        with self._locked():
            if not self.exists:
                self.init()
                return True
        missing = [role for role in ONLINE_ROLES
                   if not (self.keys_dir / "online" / f"{role}.pem").is_file()]
        if missing:
            raise RepositoryConfigError(
                f"the repository in {self.location} exists, but this worker has no online "
                f"key for {', '.join(missing)} in {self.keys_dir / 'online'}: give every "
                "worker the keys of the first (EDGEFLEET_STORE_DIR; in Kubernetes a Secret "
                "volume)")
        return False

    # ----------------------------------------------------------------- reading

    def _load(self, name: str) -> Metadata:
        data = self.storage.read_bytes(f"metadata/{name}", MAX_METADATA_BYTES)
        try:
            return Metadata.from_bytes(data)
        except DeserializationError as exc:
            raise ObjectCorruptError(f"{self.location}/metadata/{name}: not TUF metadata "
                                     f"({exc})") from exc

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

    def _locked(self) -> AbstractContextManager[None]:
        return self._lock()

    def _write(self, name: str, metadata: Metadata) -> None:
        self.storage.write_bytes(f"metadata/{name}", metadata.to_bytes(self._serializer))

    def _write_root(self, root: Root, signers: list[Signer]) -> None:
        metadata = Metadata(root)
        for signer in signers:
            metadata.sign(signer, append=True)
        self._write(f"{root.version}.root.json", metadata)
        self._write("root.json", metadata)

    def _commit(self, targets: Targets | None = None, bump_snapshot: bool = True) -> None:
        """Write new targets (optional), snapshot and timestamp, in that order."""
        now = utcnow()
        if targets is not None:
            metadata = Metadata(targets)
            metadata.sign(self.online_signer("targets"))
            self._write(f"{targets.version}.targets.json", metadata)
        first = not self.exists
        if bump_snapshot or targets is not None:
            if not first:
                snapshot = self.snapshot().signed
                snapshot.version += 1
            else:
                snapshot = Snapshot()
            if targets is not None:
                snapshot.meta["targets.json"] = MetaFile(version=targets.version)
            snapshot.expires = now + self.expiry.snapshot
            metadata = Metadata(snapshot)
            metadata.sign(self.online_signer("snapshot"))
            self._write(f"{snapshot.version}.snapshot.json", metadata)
            snapshot_version = snapshot.version
        else:
            snapshot_version = self.timestamp().signed.snapshot_meta.version
        if not first:
            timestamp = self.timestamp().signed
            timestamp.version += 1
        else:
            timestamp = Timestamp()
        timestamp.snapshot_meta = MetaFile(version=snapshot_version)
        timestamp.expires = now + self.expiry.timestamp
        metadata = Metadata(timestamp)
        metadata.sign(self.online_signer("timestamp"))
        self._write("timestamp.json", metadata)  # last: it now points at what is all there

    # ---------------------------------------------------------------- changing

    def publish(self, bundle: Path, target_name: str) -> TargetFile:
        """Add ``bundle`` as target ``target_name`` and re-sign targets/snapshot/timestamp."""
        with self._locked():
            self._require()
            target = TargetFile.from_file(target_name, str(bundle), ["sha256"])
            stored = f"targets/{target.hashes['sha256']}.{target_name}"
            if not self.storage.exists(stored):
                self.storage.write_file(stored, bundle)
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
                f"no repository in {self._place}: run `edge-fleet keys init` first"
            )
