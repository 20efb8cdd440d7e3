"""``edge-fleet serve``: database, first admin token, broker, ingest and API in one process.

Start-up order matters: the database and token exist before the API accepts requests, and
the broker listens before ingest connects. Shut-down reverses it, and a broker we started
is stopped with us.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import uvicorn
from sqlmodel import Session

from agent.contract import utcnow
from agent.mqtt import BrokerAddress
from fleet import enrollment, telemetry
from fleet.api import create_app
from fleet.api.routes.device_config import DeviceBroker
from fleet.broker.accounts import BrokerAccounts, worker_account
from fleet.broker.dynsec import DynsecAccounts
from fleet.data_dir import DataDirLock, local_broker_port
from fleet.db import init_db, make_engine
from fleet.desired_resend import resend_unacknowledged
from fleet.drift import store as drift_store
from fleet.drift.notify import DriftNotifier
from fleet.drift.webhook import SIGNATURE_HEADER, WebhookConfigError, WebhookTarget
from fleet.ingest import IngestWorker
from fleet.leader import Leadership
from fleet.local_broker import LocalBroker, free_port
from fleet.periodic import Periodic
from fleet.publisher import Publisher, publisher_for
from fleet.rollouts import controller as rollout_controller
from fleet.settings import Settings
from fleet.tokens import ensure_admin_token
from fleet.trust.repository import FleetRepository, RepositoryConfigError, open_repository

__all__ = ["LocalBrokerPortTaken", "ServeError", "serve"]

log = logging.getLogger(__name__)


def _expire_telemetry(engine, settings: Settings) -> str | None:
    cutoff = utcnow() - timedelta(days=settings.telemetry_retention_days)
    with Session(engine) as session:
        deleted = telemetry.delete_older_than(session, cutoff)
        windows = drift_store.delete_older_than(session, cutoff)
    if not deleted and not windows:
        return None
    return (f"deleted {deleted} heartbeats and {windows} drift windows older than "
            f"{cutoff:%Y-%m-%d %H:%M}")


def _drift_notifier(engine, settings: Settings, say: Callable[[str], None]
                    ) -> DriftNotifier | None:
    """The drift webhook's sender, when a URL is configured (refused at start-up if the
    URL is unusable, not at the first alert)."""
    if not settings.drift_webhook_url:
        return None
    secret = settings.drift_webhook_secret
    if not secret:
        path = settings.drift_webhook_secret_file
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            say(f"drift webhook secret created: {path} (mode 0600; give it to the receiver)")
        secret = path.read_text().strip()
    try:
        target = WebhookTarget(url=settings.drift_webhook_url, secret=secret.encode())
    except WebhookConfigError as exc:
        raise ServeError(f"EDGEFLEET_DRIFT_WEBHOOK_URL: {exc}") from None
    say(f"drift alerts are posted to {target.url.split('?')[0]} (signed, header "
        f"{SIGNATURE_HEADER})")
    return DriftNotifier(engine, target)


class ServeError(RuntimeError):
    """The fleet cannot start as configured; the message says what to change."""


class LocalBrokerPortTaken(ServeError):
    """The local broker cannot listen where this data directory's agents expect it."""


def _port_taken(port: int, host: str = "127.0.0.1") -> bool:
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((probe_host, port)) == 0


def _tick_rollouts(engine, publisher: Publisher, repository: FleetRepository,
                   settings: Settings) -> str | None:
    if not publisher.connected:
        return None  # decisions wait for the broker: a notification must go out with them
    done = rollout_controller.tick(engine, repository.online_signer("director"),
                                   publisher.publish, pickup_every_s=settings.rollout_pickup_s)
    return "; ".join(done) if done else None


def _resend_desired(engine, publisher: Publisher, settings: Settings) -> str | None:
    if not publisher.connected:
        return None
    with Session(engine) as session:
        resent = resend_unacknowledged(session, publisher.publish,
                                       timeout_s=settings.desired_resend_s)
    if not resent:
        return None
    return (f"published the desired state again to {len(resent)} device(s) that had not "
            f"acknowledged it: {', '.join(resent[:10])}")


def _exit_on_signal(_signum: int, _frame: object) -> None:
    raise SystemExit(0)  # a requested stop that completed its clean-up is a success


def _api_url(settings: Settings) -> str:
    """The API's URL as a process on this host reaches it (a wildcard bind: loopback)."""
    host = settings.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


class _LocalAgent:
    """The quickstart's device: enrolled with this fleet like any device (``edge-agent
    enroll``, once the API answers), then a real ``edge-agent run`` next to the fleet, so
    a deployment to it is verified and installed as on a real device."""

    def __init__(
        self, settings: Settings, device_id: str, broker_env: str | None,
        say: Callable[[str], None], issue_code: Callable[[], str],
    ) -> None:
        self.device_id = device_id
        self.api_url = _api_url(settings)
        self.agents_dir = settings.data_dir / "agents"
        self.state_dir = self.agents_dir / device_id
        self.log_path = self.agents_dir / f"{device_id}.log"
        # Given only for a broker the fleet was told (--broker): the local broker is
        # learnt at enrollment, as a device would.
        self._broker_env = broker_env
        self._issue_code = issue_code
        self._say = say
        self._lock = threading.Lock()
        self._stopping = False
        self.process: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._enroll_and_run, name="local-agent",
                                        daemon=True)

    def start(self) -> None:
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            process = self.process
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _command(self, *args: str) -> list[str]:
        script = Path(sys.executable).parent / "edge-agent"
        return ([str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]) + [
            *args]

    def _enroll_and_run(self) -> None:
        if not self._wait_for_api(deadline=time.monotonic() + 60):
            return
        # --force: the local agent's state lives in this data directory, so re-pinning
        # this very fleet's root is safe, and keeps its fleet URL and broker current
        # when the fleet restarts on another port.
        try:
            code = self._issue_code()
        except Exception as exc:  # the database refused: say so, the fleet goes on
            self._say(f"agent: no enrollment code for {self.device_id} ({exc}); it is not "
                      "started")
            return
        enroll = self._command("enroll", "--fleet", self.api_url, "--code", code,
                               "--state-dir", str(self.state_dir), "--force")
        with self.log_path.open("ab") as log_file:
            done = subprocess.run(enroll, stdout=log_file, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=120, check=False)
        if done.returncode != 0:
            self._say(f"agent: {self.device_id} could not enroll with {self.api_url} "
                      f"(see {self.log_path}); it is not started")
            return
        env = dict(os.environ)
        if self._broker_env is not None:
            # In the environment, not argv: a broker password must not show in `ps`.
            env["EDGE_AGENT_BROKER"] = self._broker_env
        run = self._command("run", "--state-dir", str(self.state_dir), "--interval", "5")
        with self._lock:
            if self._stopping:
                return
            with self.log_path.open("ab") as log_file:
                self.process = subprocess.Popen(
                    run,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the fleet, which stops it first
                    env=env,
                )
        self._say(f"agent: {self.device_id} enrolled with {self.api_url} and running "
                  f"(log {self.log_path})")

    def _wait_for_api(self, deadline: float) -> bool:
        while not self._stopping and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/healthz", timeout=2):
                    return True
            except OSError:
                time.sleep(0.2)
        if not self._stopping:
            self._say(f"agent: the API at {self.api_url} did not answer within 60 s; "
                      f"{self.device_id} is not started")
        return False


def _start_broker(
    settings: Settings, say: Callable[[str], None],
) -> tuple[LocalBroker | None, str, BrokerAccounts | None]:
    """The broker this fleet uses: the one given, or a local one with accounts (no
    anonymous access) whose port is kept per data directory; and who makes accounts."""
    if settings.broker_url is not None:
        say(f"broker: {BrokerAddress.parse(settings.broker_url)}")
        accounts = None
        if settings.broker_admin_url:
            try:
                accounts = DynsecAccounts(BrokerAddress.parse(settings.broker_admin_url))
            except ValueError as exc:
                raise ServeError(f"EDGEFLEET_BROKER_ADMIN_URL: {exc}") from None
        return None, settings.broker_url, accounts
    port = local_broker_port(settings.data_dir, free_port)
    local_broker = LocalBroker(settings.data_dir / "broker", port, accounts=True,
                               host=settings.host)
    try:
        local_broker.start()
    except RuntimeError as exc:
        if _port_taken(port):
            raise LocalBrokerPortTaken(
                f"the local broker's port {port} (kept for this data directory "
                f"in {settings.data_dir / 'broker-port'}, so agents find it again) is in "
                "use by another program: stop it, or give --broker URL"
            ) from None
        raise LocalBrokerPortTaken(f"the local broker did not start: {exc}") from None
    say(f"broker: {local_broker.url} (local mosquitto on {settings.host}, accounts only, "
        f"log {local_broker.log_path})")
    return local_broker, local_broker.url, DynsecAccounts(local_broker.admin_address())


def _local_agent_code(engine, repository: FleetRepository, device_id: str) -> str:
    """The quickstart's device enrolls like any other: with a code of its own."""
    with Session(engine) as session:
        return enrollment.issue_code(session, repository.root().signed, device_id,
                                     actor="system:quickstart").code


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
    if settings.device_broker_url:
        try:
            DeviceBroker.from_urls(settings.device_broker_url, settings.device_broker_url)
        except ValueError as exc:
            raise ServeError(f"EDGEFLEET_DEVICE_BROKER_URL: {exc}") from None
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    say(f"database: {engine.url.render_as_string(hide_password=True)}")
    if ensure_admin_token(engine, settings.admin_token_file):
        say(f"admin token created: {settings.admin_token_file} (mode 0600; keep it secret)")
    elif not settings.admin_token_file.exists():
        say("admin token: the database has tokens already (another worker's first start, "
            f"or `edge-fleet token create`); none is written to {settings.admin_token_file}")
    try:
        repository = open_repository(settings, engine)
        created = repository.ensure()
    except RepositoryConfigError as exc:  # a store error too: bucket, credentials, keys
        raise ServeError(f"update repository: {exc}") from None
    if created:
        say(
            f"signing keys created: {repository.keys_dir}; move {repository.keys_dir / 'root'} "
            "offline (it is only needed to rotate keys)"
        )
    if settings.store_url:
        say(f"store: {repository.location} (metadata and bundles, shared by every worker; "
            f"signing keys in {repository.keys_dir})")
    elif settings.store_dir is not None and not created:
        say(f"store: {settings.store_dir} (signing keys, metadata and bundles, shared by "
            "every worker)")
    worker_id = settings.worker_id or f"{socket.gethostname()}-{settings.port}"
    # The chores (re-signing, retention, rollouts, resends) run where the leader's lock is:
    # its log lines say when this worker takes the role or gives it up.
    leadership = Leadership(engine, worker_id).start()

    def leads() -> bool:
        return leadership.is_leader

    chores = [
        Periodic("re-sign metadata", settings.metadata_refresh_s, repository.refresh_expiring,
                 when=leads),
        Periodic("telemetry retention", 3600, lambda: _expire_telemetry(engine, settings),
                 when=leads),
    ]
    for chore in chores:
        chore.start()

    local_broker, broker_url, accounts = _start_broker(settings, say)
    publisher_url = settings.publisher_broker_url
    if accounts is not None:
        if local_broker is not None:
            broker_url = BrokerAddress.parse(broker_url).with_account(
                worker_account(worker_id), accounts.add_worker(worker_id)).url()
        if publisher_url is None:
            publisher_url = BrokerAddress.parse(broker_url).with_account(
                worker_account(f"{worker_id}-publisher"),
                accounts.add_worker(f"{worker_id}-publisher")).url()
        say(f"broker accounts: made by this fleet ({accounts.describe()}): one per device "
            "at enrollment, removed at revocation")
    else:
        say("broker accounts: not managed by this fleet (no EDGEFLEET_BROKER_ADMIN_URL): "
            "devices enroll without credentials; give them accounts on the broker yourself")

    notifier = _drift_notifier(engine, settings, say)
    ingest = IngestWorker(
        BrokerAddress.parse(broker_url),
        engine,
        queue_max=settings.ingest_queue_max,
        batch_wait_s=settings.ingest_batch_wait_s,
        worker_id=worker_id,
        shared=settings.ingest_shared,
        notify_drift=notifier is not None,
        on_drift_alert=notifier.wake if notifier is not None else None,
    )
    if notifier is not None:
        notifier.start()
    ingest.start()
    publisher, said = publisher_for(
        BrokerAddress.parse(broker_url),
        BrokerAddress.parse(publisher_url) if publisher_url else None,
        worker_id, ingest.link)
    publisher.start()
    say(said)
    resend = Periodic("resend desired", max(1.0, settings.desired_resend_s / 4),
                      lambda: _resend_desired(engine, publisher, settings), when=leads).start()
    chores.append(resend)
    controller = Periodic("rollout controller", settings.rollout_tick_s,
                          lambda: _tick_rollouts(engine, publisher, repository, settings),
                          when=leads).start()
    chores.append(controller)
    device_broker = DeviceBroker.from_urls(broker_url, settings.device_broker_url)
    say(f"devices are told the broker {device_broker.url_for(None)} at enrollment"
        + ("" if device_broker.fixed else " (with the host name they reach the API by)")
        + "; set EDGEFLEET_DEVICE_BROKER_URL if they reach it elsewhere")
    app = create_app(engine, ingest, repository, device_broker, publisher, accounts)
    app.state.leadership = leadership
    agent = None
    if local_agent_id is not None:
        agent = _LocalAgent(
            settings, local_agent_id, None if accounts is not None else broker_url, say,
            issue_code=lambda: _local_agent_code(engine, repository, local_agent_id))
        agent.start()
        say(f"agent: {local_agent_id} starts once the API answers (log {agent.log_path})")
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
            agent.stop()
        for chore in chores:
            chore.stop()
        leadership.stop()
        publisher.stop()
        ingest.stop()
        if notifier is not None:
            notifier.stop()
        if local_broker is not None:
            local_broker.stop()
        engine.dispose()
