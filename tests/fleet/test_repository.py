"""The fleet's TUF repository keeps its short-lived metadata fresh and its files consistent."""

from __future__ import annotations

import time
from datetime import timedelta

from tuf.api.metadata import Metadata

from agent.contract import utcnow
from fleet.periodic import Periodic
from fleet.trust.repository import Expiry, FleetRepository


def test_timestamp_is_resigned_past_half_its_lifetime(tmp_path):
    repository = FleetRepository(tmp_path)
    repository.init()
    before = repository.timestamp().signed
    assert before.expires - utcnow() <= timedelta(days=1)
    assert repository.refresh_expiring() == []  # fresh: nothing to do
    later = utcnow() + timedelta(hours=13)
    assert repository.refresh_expiring(now=later) == ["timestamp"]
    after = repository.timestamp().signed
    assert after.version == before.version + 1
    assert after.snapshot_meta.version == before.snapshot_meta.version
    assert repository.refresh_expiring(now=utcnow() + timedelta(days=4)) == [
        "snapshot", "timestamp"
    ]
    Metadata.from_file(str(repository.metadata_dir / "timestamp.json"))  # still parses


def test_running_refresher_resigns_a_short_lived_timestamp(tmp_path):
    repository = FleetRepository(tmp_path, Expiry(timestamp=timedelta(seconds=2)))
    repository.init()
    first = repository.timestamp().signed.version
    refresher = Periodic("re-sign", 0.2, repository.refresh_expiring)
    refresher.start()
    try:
        time.sleep(2.5)
    finally:
        refresher.stop()
    timestamp = repository.timestamp().signed
    assert timestamp.version > first
    assert timestamp.expires > utcnow()


def test_publishing_keeps_old_versions_for_clients_mid_update(tmp_path, make_bundle):
    repository = FleetRepository(tmp_path / "repo")
    repository.init()
    built = make_bundle(version=1)
    target = repository.publish(built.path, built.manifest.target_name)
    assert target.length == built.size and target.hashes["sha256"] == built.sha256
    names = {p.name for p in repository.metadata_dir.iterdir()}
    assert {"1.targets.json", "2.targets.json", "1.snapshot.json", "2.snapshot.json"} <= names
    stored = repository.targets_dir / f"{built.sha256}.detector-1.bundle"
    assert stored.read_bytes() == built.path.read_bytes()
