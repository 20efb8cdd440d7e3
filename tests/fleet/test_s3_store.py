"""The update repository in an S3-compatible bucket (a real ``moto_server`` over HTTP).

Metadata and bundles live in the bucket, keys on each worker's disk; a second worker reads
what the first signed; the fleet's own /repo routes stream from the bucket to the agent's
TUF client, which verifies and resumes with a Range; two workers publishing at once under
the PostgreSQL lock leave one consistent chain of versions; a missing, oversized or
garbled object is a named error, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Root

from agent.contract import utcnow
from fleet.db import make_engine
from fleet.local_broker import free_port
from fleet.settings import Settings
from fleet.trust.repository import (
    MAX_METADATA_BYTES,
    FleetRepository,
    RepositoryConfigError,
    open_repository,
    repository_lock,
)
from fleet.trust.storage import (
    ObjectCorruptError,
    ObjectMissingError,
    ObjectTooLargeError,
    S3Storage,
    StoreBusyError,
    StoreConfigError,
    StoreUnavailableError,
)
from tests.fixtures.processes import console_script
from tests.fixtures.trust import NetworkFaults, make_device_side, serve_repository


def _worker(data_dir: Path, s3_store, lock=None) -> FleetRepository:
    return FleetRepository(data_dir, storage=s3_store.storage(), lock=lock)


def _same_keys(first: FleetRepository, data_dir: Path) -> Path:
    """What a Kubernetes Secret volume gives every worker: the first worker's online keys."""
    shutil.copytree(first.keys_dir / "online", data_dir / "keys" / "online")
    return data_dir


def _file(path: Path, size: int, seed: int) -> Path:
    block = hashlib.sha256(str(seed).encode()).digest()
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


@contextlib.contextmanager
def _serving(repository: FleetRepository, tmp_path: Path) -> Iterator[tuple[str, NetworkFaults]]:
    """The fleet's app (production routes) under uvicorn, serving ``repository``."""
    with serve_repository(repository, tmp_path / "serving.db") as (url, faults, _engine):
        yield url, faults


def test_a_repository_in_a_bucket_publishes_resigns_rotates_and_another_worker_reads_it(
    s3_store, tmp_path
):
    first = _worker(tmp_path / "a", s3_store)
    assert first.ensure() is True
    bundle = _file(tmp_path / "detector-1.bundle", 200_000, seed=1)
    target = first.publish(bundle, "detector-1.bundle")
    assert first.refresh_expiring(now=utcnow() + timedelta(hours=13)) == ["timestamp"]
    assert first.rotate("timestamp") == 2

    # Metadata and bundles are objects; no key is, and the worker's disk holds no metadata.
    objects = s3_store.object_keys()
    assert all(key.startswith("fleet/repo/metadata/") or key.startswith("fleet/repo/targets/")
               for key in objects)
    assert not any(key.endswith(".pem") for key in objects)
    assert {"fleet/repo/metadata/root.json", "fleet/repo/metadata/2.root.json",
            "fleet/repo/metadata/timestamp.json", "fleet/repo/metadata/3.targets.json",
            f"fleet/repo/targets/{target.hashes['sha256']}.detector-1.bundle"} <= set(objects)
    assert not (tmp_path / "a" / "repo").exists()
    assert (tmp_path / "a" / "keys" / "online" / "timestamp.pem").is_file()
    assert s3_store.get(f"targets/{target.hashes['sha256']}.detector-1.bundle") == \
        bundle.read_bytes()

    # Another worker, on "another host": the same bucket, its own copy of the online keys.
    second = _worker(_same_keys(first, tmp_path / "b"), s3_store)
    assert second.ensure() is False
    assert second.root().signed.version == 2
    assert second.timestamp().signed.version == first.timestamp().signed.version
    assert second.target_files() == first.target_files()
    # It signs with the rotated timestamp key, and the first worker reads what it signed.
    other = _file(tmp_path / "detector-2.bundle", 1000, seed=2)
    second.publish(other, "detector-2.bundle")
    assert set(first.target_files()) == {"detector-1.bundle", "detector-2.bundle"}
    root = first.root()
    root.verify_delegate("timestamp", first.timestamp())
    root.verify_delegate("targets", first.targets())

    # A worker without the keys is told so at start, not at its first deployment.
    with pytest.raises(RepositoryConfigError, match="no online key for targets, snapshot"):
        _worker(tmp_path / "c", s3_store).ensure()
    assert first.storage.list("metadata")[:3] == ["1.root.json", "1.snapshot.json",
                                                  "1.targets.json"]


def test_open_repository_puts_metadata_in_the_bucket_and_keys_on_disk(s3_store, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", store_url=s3_store.url,
                        s3_endpoint_url=s3_store.server.endpoint)
    repository = open_repository(settings)
    assert isinstance(repository.storage, S3Storage)
    repository.init()
    assert repository.location == s3_store.url
    assert str(repository.metadata_dir) == f"{s3_store.url}/metadata"
    assert repository.keys_dir == tmp_path / "data" / "keys"
    assert (repository.keys_dir / "root" / "root-1.pem").is_file()
    assert "fleet/repo/metadata/timestamp.json" in s3_store.object_keys()
    # Without a store URL: the directory, as before.
    local = open_repository(Settings(data_dir=tmp_path / "local"))
    assert local.metadata_dir == tmp_path / "local" / "repo" / "metadata"


def test_the_agents_tuf_client_verifies_and_resumes_a_bundle_streamed_from_the_bucket(
    s3_store, tmp_path, make_bundle
):
    repository = _worker(tmp_path / "fleet", s3_store)
    repository.init()
    built = make_bundle(version=1)
    repository.publish(built.path, built.manifest.target_name)
    name = f"{built.sha256}.{built.manifest.target_name}"
    with _serving(repository, tmp_path) as (url, faults):
        timestamp = httpx.get(f"{url}/repo/metadata/timestamp.json")
        assert timestamp.status_code == 200
        assert timestamp.headers["cache-control"] == "no-store"
        assert int(timestamp.headers["content-length"]) == len(timestamp.content)
        assert timestamp.content == s3_store.get("metadata/timestamp.json")

        whole = httpx.get(f"{url}/repo/targets/{name}")
        assert whole.status_code == 200 and whole.content == built.path.read_bytes()
        assert int(whole.headers["content-length"]) == built.size
        tail = httpx.get(f"{url}/repo/targets/{name}", headers={"Range": "bytes=1000-"})
        assert tail.status_code == 206
        assert tail.headers["content-range"] == f"bytes 1000-{built.size - 1}/{built.size}"
        assert tail.content == built.path.read_bytes()[1000:]
        past = httpx.get(f"{url}/repo/targets/{name}",
                         headers={"Range": f"bytes={built.size}-"})
        assert past.status_code == 416 and past.headers["content-range"] == \
            f"bytes */{built.size}"
        assert httpx.get(f"{url}/repo/targets/{'0' * 64}.nothing.bundle").status_code == 404
        assert httpx.get(f"{url}/repo/metadata/..%2Fkeys%2Fonline.json").status_code == 404

        # The device: enroll (pin root), refresh, verify, download; the connection is cut
        # part-way, and the download resumes from the bucket with a Range.
        device = make_device_side(tmp_path / "device", url)
        device.client.refresh()
        info = device.client.target_info(built.manifest.target_name)
        faults.cut_after = built.size // 2
        downloaded = device.client.download(info)
        assert downloaded.read_bytes() == built.path.read_bytes()
        ranges = [r for path, r in faults.target_requests() if r]
        assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"

        # After a root rotation the device walks the chain from the bucket as from a disk.
        repository.rotate("targets")
        device.client.refresh()
        assert device.client.target_info(built.manifest.target_name).length == built.size


def test_two_workers_publishing_at_once_under_the_postgres_lock_leave_one_chain(
    s3_store, postgres_url, tmp_path
):
    engines = [make_engine(postgres_url), make_engine(postgres_url)]
    held: list[tuple[str, float, float]] = []

    def recorded(lock, who: str):
        @contextlib.contextmanager
        def hold():
            with lock():
                entered = time.monotonic()
                try:
                    yield
                finally:
                    held.append((who, entered, time.monotonic()))
        return hold

    first = _worker(tmp_path / "a", s3_store, recorded(repository_lock(engines[0]), "a"))
    first.init()
    second = _worker(_same_keys(first, tmp_path / "b"), s3_store,
                     recorded(repository_lock(engines[1]), "b"))
    files = {f"model-{i}.bundle": _file(tmp_path / f"model-{i}.bundle", 4096, seed=i)
             for i in range(12)}
    names = sorted(files)
    errors: list[BaseException] = []

    def publish(repository: FleetRepository, mine: list[str]) -> None:
        try:
            for name in mine:
                repository.publish(files[name], name)
                repository.refresh_expiring(now=utcnow() + timedelta(days=5))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(first, names[0::2])),
               threading.Thread(target=publish, args=(second, names[1::2]))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for engine in engines:
            engine.dispose()
    assert errors == []

    # Every bundle is in the newest targets, whichever worker published it: no lost update.
    assert sorted(first.target_files()) == names
    targets_version = first.targets().signed.version
    assert targets_version == 1 + len(names)
    # One version after another, each written once: 1..N for targets and snapshot, and the
    # timestamp names the newest snapshot, which names the newest targets.
    metadata = first.storage.list("metadata")
    assert {f"{v}.targets.json" for v in range(1, targets_version + 1)} <= set(metadata)
    snapshot = first.snapshot().signed
    assert {f"{v}.snapshot.json" for v in range(1, snapshot.version + 1)} <= set(metadata)
    assert snapshot.meta["targets.json"].version == targets_version
    assert first.timestamp().signed.snapshot_meta.version == snapshot.version
    root = first.root()
    for role, loaded in (("timestamp", first.timestamp()), ("snapshot", first.snapshot()),
                         ("targets", first.targets())):
        root.verify_delegate(role, loaded)
    # Both workers took part, and never held the lock at the same time.
    assert {who for who, _, _ in held} == {"a", "b"}
    spans = sorted((entered, left) for _, entered, left in held)
    assert all(left <= following for (_, left), (following, _) in itertools.pairwise(spans))


def test_a_worker_that_waits_too_long_for_the_lock_is_told_the_store_is_busy(
    s3_store, postgres_url, tmp_path
):
    engine = make_engine(postgres_url)
    try:
        repository = _worker(tmp_path / "a", s3_store, repository_lock(engine))
        repository.init()
        impatient = _worker(tmp_path / "a", s3_store, repository_lock(engine, wait_s=0.5))
        with repository_lock(engine)():
            started = time.monotonic()
            with pytest.raises(StoreBusyError, match="held the repository's lock") as busy:
                impatient.refresh_expiring(now=utcnow() + timedelta(days=5))
            assert time.monotonic() - started < 5
        assert busy.value.reason == "store_busy"
        assert impatient.refresh_expiring(now=utcnow() + timedelta(days=5)) == [
            "snapshot", "timestamp"]  # free again: the lock was given back
    finally:
        engine.dispose()


def test_missing_oversized_and_garbled_objects_are_named_errors(s3_store, tmp_path):
    repository = _worker(tmp_path / "fleet", s3_store)
    repository.init()
    with _serving(repository, tmp_path) as (url, _):
        s3_store.delete("metadata/1.snapshot.json")
        with pytest.raises(ObjectMissingError, match=r"1\.snapshot\.json: no such object"):
            repository.snapshot()
        assert httpx.get(f"{url}/repo/metadata/1.snapshot.json").status_code == 404

        s3_store.put("metadata/timestamp.json", b"{" * (MAX_METADATA_BYTES + 1))
        with pytest.raises(ObjectTooLargeError, match="over the 16777216-byte limit") as big:
            repository.timestamp()
        assert big.value.reason == "store_object_too_large"
        refused = httpx.get(f"{url}/repo/metadata/timestamp.json")
        assert refused.status_code == 502 and "too large" in refused.text

        s3_store.put("metadata/timestamp.json", b"not json")
        with pytest.raises(ObjectCorruptError, match="not TUF metadata"):
            repository.timestamp()
        with pytest.raises(RepositoryConfigError):  # what the CLI prints as one line
            repository.refresh_expiring()


def test_a_bucket_that_is_not_there_or_a_store_that_does_not_answer_is_said(
    s3_store, tmp_path
):
    missing = S3Storage.from_url("s3://no-such-bucket-here/x", s3_store.server.endpoint)
    with pytest.raises(StoreConfigError, match="bucket 'no-such-bucket-here' does not exist"):
        FleetRepository(tmp_path / "a", storage=missing).init()
    closed = S3Storage.from_url(s3_store.url, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailableError, match=r"metadata/timestamp\.json"):
        closed.read_bytes("metadata/timestamp.json", 100)
    for url in ("s3://", "http://bucket/x", "s3://Bad_Bucket/x", "s3://bucket/a/../b"):
        with pytest.raises(StoreConfigError, match="EDGEFLEET_STORE_URL"):
            S3Storage.from_url(url)
    with pytest.raises(ValueError, match="not a repository file name"):
        s3_store.storage().read_bytes("metadata/../../keys/online/targets.pem", 100)


def test_without_boto3_the_store_url_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(StoreConfigError, match=r"pip install 'edgefleet\[s3\]'"):
        open_repository(Settings(data_dir=tmp_path, store_url="s3://bucket/repo"))


def test_the_cli_says_what_is_wrong_with_the_store_in_one_line(s3_store, tmp_path, make_bundle):
    env = {"EDGEFLEET_DATA_DIR": str(tmp_path / "data"), **s3_store.env,
           "EDGEFLEET_STORE_URL": "s3://no-such-bucket-here/repo"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*console_script("edge-fleet"), *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, **env})

    refused = cli("keys", "init")
    assert refused.returncode == 2, refused.stderr
    assert "bucket 'no-such-bucket-here' does not exist" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "data" / "keys").exists()  # nothing made, nothing to clean up
    env["EDGEFLEET_STORE_URL"] = s3_store.url
    assert cli("keys", "init").returncode == 0
    built = make_bundle(version=1)
    published = cli("bundle", "publish", str(built.path))
    assert published.returncode == 0, published.stderr
    assert built.manifest.target_name in FleetRepository(
        tmp_path / "data", storage=s3_store.storage()).target_files()
    Metadata[Root].from_bytes(s3_store.get("metadata/root.json"))
    # Keys here, but the store URL names another (empty) place: refused, keys kept.
    env["EDGEFLEET_STORE_URL"] = f"{s3_store.url}-typo"
    elsewhere = cli("keys", "init")
    assert elsewhere.returncode == 2 and "holds keys but" in elsewhere.stderr
    assert "Traceback" not in elsewhere.stderr
