"""Telemetry that loses nothing: a broker outage and a fleet worker restart under load.

Three real agents publish heartbeats at 20 messages a second each, through their durable
outboxes, into a real mosquitto (with the production ACL) and a real ``edge-fleet serve``.
The broker is stopped for 20 s and restarted; later the fleet worker is restarted. Then
every telemetry seq each agent logged as produced must be in the database exactly once,
checked row by row. Runs over SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from sqlalchemy import text

from fleet.db import make_engine
from tests.fixtures.broker import FLEET_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until

AGENTS = ("sensor-1", "sensor-2", "sensor-3")
QUEUED = re.compile(r"queued telemetry seq (\d+)")


def _stored(database_url: str) -> dict[str, list[int]]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT device_id, seq FROM heartbeat")).all()
    finally:
        engine.dispose()
    stored: dict[str, list[int]] = {device: [] for device in AGENTS}
    for device_id, seq in rows:
        stored.setdefault(device_id, []).append(seq)
    return stored


def test_no_heartbeat_is_lost_or_doubled_across_broker_and_worker_restarts(
    tmp_path, mosquitto, agents, database_url
):
    fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)
    running = {d: agents.start(d, mosquitto, interval=0.05, log_level="DEBUG") for d in AGENTS}
    try:
        wait_until(lambda: all(fleet.device(d) for d in AGENTS), timeout=15, what="agents")
        time.sleep(3)
        mosquitto.stop()
        time.sleep(20)  # the outage: agents keep producing into their outboxes
        mosquitto.start()
        time.sleep(5)
        fleet.terminate()  # a fleet worker restart (same worker id: its session waits)
        time.sleep(2)
        fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)
        time.sleep(3)

        produced = {d: [int(s) for s in QUEUED.findall(a.log())] for d, a in running.items()}
        for device, seqs in produced.items():
            assert len(seqs) > 20 * 28, f"{device} produced only {len(seqs)} heartbeats"

        def all_stored():
            stored = _stored(database_url)
            return all(set(produced[d]) <= set(stored[d]) for d in AGENTS) and stored

        stored = wait_until(all_stored, timeout=60, interval=1, what="the backlog to drain")
        for device in AGENTS:
            counts = Counter(stored[device])
            doubled = [seq for seq, n in counts.items() if n > 1]
            missing = sorted(set(produced[device]) - set(counts))
            assert missing == [] and doubled == [], (device, missing[:5], doubled[:5])
        beat = fleet.device("sensor-1")["heartbeat"]
        assert beat["outbox_dropped"] == {}  # 64 MB budget: nothing had to be dropped
    finally:
        fleet.terminate()
