"""The update repository in a bucket, end to end: real ``edge-fleet serve`` processes with
``EDGEFLEET_STORE_URL`` on a real S3-compatible server (moto_server), a real broker and a
real ``edge-agent``.

Over PostgreSQL two workers share the bucket, each with its own data directory holding a
copy of the online keys (as a Kubernetes Secret would give them): the bundle is published
through the first worker's CLI, and the device enrolls with, and downloads from, the
second, which never had the bundle on its disk. Over SQLite one worker does it all.
"""

from __future__ import annotations

import shutil

from tests.fixtures.broker import FLEET_ACCOUNT, PUBLISHER_ACCOUNT, fleet_account
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until


def _active(fleet, device_id: str) -> dict | None:
    device = fleet.device(device_id)
    return device["active_model"] if device else None


def test_a_bundle_in_a_bucket_is_deployed_through_the_fleets_repo_routes(
    tmp_path, mosquitto, database_url, agents, make_bundle, s3_store
):
    postgres = database_url.startswith("postgresql")
    shared = {"EDGEFLEET_INGEST_SHARED": "true"} if postgres else {}
    first = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url,
                        publisher_broker_url=mosquitto.url_for(PUBLISHER_ACCOUNT),
                        extra_env={**s3_store.env, **shared})
    workers = [first]
    try:
        assert f"store: {s3_store.url}" in first.log()
        serving = first
        if postgres:
            shutil.copytree(first.data_dir / "keys" / "online",
                            tmp_path / "fleet-b" / "keys" / "online")
            serving = start_fleet(
                tmp_path, mosquitto.url_for(fleet_account("fleet-b")), database_url,
                name="fleet-b",
                publisher_broker_url=mosquitto.url_for(fleet_account("fleet-b-publisher")),
                extra_env={**s3_store.env, **shared})
            serving.token = first.token
            workers.append(serving)

        bundle = make_bundle(version=1)
        published = first.cli("bundle", "publish", str(bundle.path))
        assert published.returncode == 0, published.stderr
        assert f"published detector v1 as {bundle.manifest.target_name}" in published.stdout
        stored = f"targets/{bundle.sha256}.{bundle.manifest.target_name}"
        assert s3_store.get(stored) == bundle.path.read_bytes()
        for worker in workers:
            assert not (worker.data_dir / "repo").exists()

        assert "enrolled with" in agents.enroll("edge-s3", serving.url)
        agent = agents.start("edge-s3", mosquitto)
        wait_until(lambda: serving.device("edge-s3"), timeout=15, what="edge-s3 registered")
        deployed = serving.cli("deploy", "detector", "--version", "1", "--device", "edge-s3")
        assert deployed.returncode == 0, deployed.stderr
        wait_until(lambda: _active(serving, "edge-s3") == {"name": "detector", "version": 1},
                   timeout=30, what="v1 active on edge-s3")
        wait_until(lambda: [e["event"] for e in serving.events("edge-s3")] == [
            "started", "desired_received", "downloading", "verified", "installed", "healthy"
        ], timeout=20, what="the install's events, in order")
        assert "Traceback" not in agent.log()
        for worker in workers:
            assert "Traceback" not in worker.log()
    finally:
        for worker in reversed(workers):
            worker.terminate()
