"""``edge-fleet serve``: database, first admin token, broker, ingest and API in one process.

Start-up order matters: the database and token exist before the API accepts requests, and
the broker listens before ingest connects. Shut-down reverses it, and a broker we started
is stopped with us.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import uvicorn

from agent.mqtt import BrokerAddress
from fleet.api import create_app
from fleet.db import init_db, make_engine
from fleet.ingest import IngestWorker
from fleet.local_broker import LocalBroker
from fleet.settings import Settings
from fleet.tokens import ensure_admin_token

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(settings: Settings, say: Callable[[str], None] = print) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    say(f"database: {engine.url.render_as_string(hide_password=True)}")
    if ensure_admin_token(engine, settings.admin_token_file):
        say(f"admin token created: {settings.admin_token_file} (mode 0600; keep it secret)")

    local_broker = None
    broker_url = settings.broker_url
    if broker_url is None:
        local_broker = LocalBroker(settings.data_dir / "broker").start()
        broker_url = local_broker.url
        say(f"broker: {broker_url} (local mosquitto, log {local_broker.log_path})")
    else:
        say(f"broker: {BrokerAddress.parse(broker_url)}")

    ingest = IngestWorker(
        BrokerAddress.parse(broker_url), engine, queue_max=settings.ingest_queue_max
    )
    ingest.start()
    app = create_app(engine, ingest)
    say(f"API: http://{settings.host}:{settings.port}/api/v1/devices  (health: /healthz)")
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception so the
    # clean-up below runs instead of the process dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        ingest.stop()
        if local_broker is not None:
            local_broker.stop()
        engine.dispose()
