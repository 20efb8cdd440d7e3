"""Fleet settings, from ``EDGEFLEET_*`` environment variables (pydantic-settings).

Defaults are the zero-set-up ones: SQLite in the data directory and, when no broker URL is
given, a local broker started by ``edge-fleet serve``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefleet"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    # The update repository (signing keys, TUF metadata, bundles) when several workers share
    # one: a directory every worker mounts. Default: the data directory (one worker).
    store_dir: Path | None = None
    # Or the repository's metadata and bundles in an S3-compatible bucket every worker
    # reaches: s3://BUCKET/PREFIX (needs the s3 extra; credentials from the AWS chain). The
    # signing keys stay on disk all the same (store_dir, else the data directory: keys/).
    store_url: str | None = None
    # The store's endpoint when it is not AWS S3 (MinIO, Ceph): http://minio:9000.
    s3_endpoint_url: str | None = None
    database_url: str | None = None
    broker_url: str | None = None
    # An account of its own for publishing desired states (fleet.publisher), when the
    # broker has accounts: mqtt://edgefleet-fleet-WORKER-publisher:PASSWORD@HOST:PORT.
    publisher_broker_url: str | None = None
    # The broker address devices are told at enrollment (GET /api/v1/device-config), when
    # it differs from the fleet's own (NAT, another name): mqtt://HOST:PORT, no credentials.
    device_broker_url: str | None = None
    # The broker's account admin (Mosquitto's dynamic security: the account made by
    # deploy/mosquitto/add-account.sh --init), so the fleet makes each device's account at
    # enrollment and removes it at revocation: mqtt://edgefleet-admin:PASSWORD@HOST:PORT.
    # The local broker (no broker URL given) always has one.
    broker_admin_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    ingest_queue_max: int = 10_000
    # A batch is stored when it has 500 messages or its first waited this long: longer
    # waits mean fewer, fuller transactions (fewer commits for the database) and later rows.
    ingest_batch_wait_s: float = Field(default=0.05, gt=0, le=10)
    # Stable per worker (default: host name + API port), so the broker keeps this worker's
    # session and unacknowledged messages across its restarts.
    worker_id: str | None = None
    # Several workers on one broker split telemetry, events and drift through a shared
    # subscription; a lone worker subscribes directly, which survives a Mosquitto restart
    # (Mosquitto 2.0 does not restore shared subscriptions: see fleet.ingest).
    ingest_shared: bool = False
    # An online device that has not acknowledged its desired state this long after it was
    # published gets it again (the wait doubles each time; at most 5 publications).
    desired_resend_s: float = Field(default=60.0, gt=0, le=86_400)
    # How often the rollout controller looks at running rollouts.
    rollout_tick_s: float = Field(default=2.0, gt=0, le=3600)
    # How often a running rollout looks for devices newly matching its selector.
    rollout_pickup_s: float = Field(default=10.0, ge=0, le=86_400)
    metadata_refresh_s: float = 60.0
    # Heartbeats and drift windows older than this are deleted (drift alerts are kept).
    telemetry_retention_days: float = 7.0
    # Drift alerts (raised and cleared) are POSTed here, signed with HMAC-SHA256
    # (fleet.drift.webhook); the secret is EDGEFLEET_DRIFT_WEBHOOK_SECRET, else the file
    # DATA_DIR/drift-webhook-secret (made at the first start, mode 0600).
    drift_webhook_url: str | None = None
    drift_webhook_secret: str | None = None

    @property
    def drift_webhook_secret_file(self) -> Path:
        return self.data_dir / "drift-webhook-secret"

    @property
    def repository_dir(self) -> Path:
        return self.store_dir or self.data_dir

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"
