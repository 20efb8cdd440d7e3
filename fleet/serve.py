"""``edge-fleet serve``: database, first admin token, broker, ingest and API in one process.

Start-up order matters: the database and token exist before the API accepts requests, and
the broker listens before ingest connects. Shut-down reverses it, and a broker we started
is stopped with us.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import uvicorn
from sqlmodel import Session

from agent.contract import utcnow
from agent.mqtt import BrokerAddress
from fleet import telemetry
from fleet.api import create_app
from fleet.data_dir import DataDirLock, local_broker_port
from fleet.db import init_db, make_engine
from fleet.ingest import IngestWorker
from fleet.local_broker import LocalBroker, free_port
from fleet.periodic import Periodic
from fleet.settings import Settings
from fleet.tokens import ensure_admin_token
from fleet.trust.repository import FleetRepository

__all__ = ["LocalBrokerPortTaken", "ServeError", "serve"]

log = logging.getLogger(__name__)


def _expire_telemetry(engine, settings: Settings) -> str | None:
    cutoff = utcnow() - timedelta(days=settings.telemetry_retention_days)
    with Session(engine) as session:
        deleted = telemetry.delete_older_than(session, cutoff)
    return f"deleted {deleted} heartbeats older than {cutoff:%Y-%m-%d %H:%M}" if deleted else None


class ServeError(RuntimeError):
    """The fleet cannot start as configured; the message says what to change."""


class LocalBrokerPortTaken(ServeError):
    """The local broker cannot listen where this data directory's agents expect it."""


def _port_taken(port: int, host: str = "127.0.0.1") -> bool:
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((probe_host, port)) == 0


def _exit_on_signal(_signum: int, _frame: object) -> None:
    raise SystemExit(0)  # a requested stop that completed its clean-up is a success


def _start_local_agent(settings: Settings, broker_url: str, device_id: str) -> subprocess.Popen:
    """The quickstart's device: a real ``edge-agent run`` next to the fleet."""
    agents_dir = settings.data_dir / "agents"
    agents_dir.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).parent / "edge-agent"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]
    command += [
        "run",
        "--device-id", device_id,
        "--state-dir", str(agents_dir / device_id),
        "--interval", "5",
    ]  # fmt: skip
    with (agents_dir / f"{device_id}.log").open("ab") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the fleet, which stops the agent first
            # In the environment, not argv: a broker password must not show in `ps`.
            env={**os.environ, "EDGE_AGENT_BROKER": broker_url},
        )


def serve(
    settings: Settings,
    say: Callable[[str], None] = print,
    local_agent_id: str | None = None,
) -> None:
    """Run until SIGINT/SIGTERM. ``local_agent_id`` also runs an agent (the quickstart)."""
    with DataDirLock(settings.data_dir):
        _serve_locked(settings, say, local_agent_id)


def _serve_locked(
    settings: Settings, say: Callable[[str], None], local_agent_id: str | None
) -> None:
    if _port_taken(settings.port, settings.host):
        raise ServeError(
            f"the API address {settings.host}:{settings.port} is in use: stop what listens "
            "there, or choose another with --port (EDGEFLEET_PORT)"
        )
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    say(f"database: {engine.url.render_as_string(hide_password=True)}")
    if ensure_admin_token(engine, settings.admin_token_file):
        say(f"admin token created: {settings.admin_token_file} (mode 0600; keep it secret)")
    repository = FleetRepository(settings.data_dir)
    if not repository.exists:
        repository.init()
        say(
            f"signing keys created: {repository.keys_dir}; move {repository.keys_dir / 'root'} "
            "offline (it is only needed to rotate keys)"
        )
    chores = [
        Periodic("re-sign metadata", settings.metadata_refresh_s, repository.refresh_expiring),
        Periodic("telemetry retention", 3600, lambda: _expire_telemetry(engine, settings)),
    ]
    for chore in chores:
        chore.start()

    local_broker = None
    broker_url = settings.broker_url
    if broker_url is None:
        port = local_broker_port(settings.data_dir, free_port)
        local_broker = LocalBroker(settings.data_dir / "broker", port)
        try:
            local_broker.start()
        except RuntimeError as exc:
            if _port_taken(port):
                raise LocalBrokerPortTaken(
                    f"the local broker's port 127.0.0.1:{port} (kept for this data directory "
                    f"in {settings.data_dir / 'broker-port'}, so agents find it again) is in "
                    "use by another program: stop it, or give --broker URL"
                ) from None
            raise LocalBrokerPortTaken(f"the local broker did not start: {exc}") from None
        broker_url = local_broker.url
        say(f"broker: {broker_url} (local mosquitto, log {local_broker.log_path})")
    else:
        say(f"broker: {BrokerAddress.parse(broker_url)}")

    ingest = IngestWorker(
        BrokerAddress.parse(broker_url),
        engine,
        queue_max=settings.ingest_queue_max,
        batch_wait_s=settings.ingest_batch_wait_s,
        worker_id=settings.worker_id or f"{socket.gethostname()}-{settings.port}",
        shared=settings.ingest_shared,
    )
    ingest.start()
    app = create_app(engine, ingest, repository)
    agent = None
    if local_agent_id is not None:
        agent = _start_local_agent(settings, broker_url, local_agent_id)
        say(f"agent: {local_agent_id} (log {settings.data_dir / 'agents'}/{local_agent_id}.log)")
    api = f"http://{settings.host}:{settings.port}"
    say(f"API: {api}/api/v1/devices  (health: {api}/healthz)")
    say(
        f"look: edge-fleet devices list --url {api}   or   curl -H "
        f'"Authorization: Bearer $(cat {settings.admin_token_file})" {api}/api/v1/devices'
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception so the
    # clean-up below runs instead of the process dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(10)
        ingest.stop()
        for chore in chores:
            chore.stop()
        if local_broker is not None:
            local_broker.stop()
        engine.dispose()
