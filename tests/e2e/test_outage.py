"""Telemetry that loses nothing: a broker outage and a fleet worker restart under load.

Three real agents publish heartbeats at 20 messages a second each, through their durable
outboxes, into a real mosquitto (with the production ACL) and a real ``edge-fleet serve``.
The broker is stopped until every agent has queued 200 heartbeats it could not send, then
restarted; later the fleet worker is restarted while agents keep producing. Then every
telemetry seq each agent logged as produced must be in the database exactly once, checked
row by row. Every step waits on a condition (what the agents logged, what the database
holds), not on the clock, so a loaded machine only makes it slower. Runs over SQLite and
PostgreSQL.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
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


def _produced(running) -> dict[str, list[int]]:
    return {d: [int(s) for s in QUEUED.findall(a.log())] for d, a in running.items()}


def _each_produced_more(running, since: dict[str, list[int]], count: int) -> bool:
    now = _produced(running)
    return all(len(now[d]) >= len(since[d]) + count for d in AGENTS)


@pytest.mark.timeout(600)
def test_no_heartbeat_is_lost_or_doubled_across_broker_and_worker_restarts(
    tmp_path, mosquitto, agents, database_url
):
    fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)
    running = {d: agents.start(d, mosquitto, interval=0.05, log_level="DEBUG") for d in AGENTS}
    try:
        wait_until(lambda: all(len(_stored(database_url)[d]) >= 20 for d in AGENTS),
                   timeout=60, what="20 heartbeats of each agent stored")
        mosquitto.stop()
        before_outage = _produced(running)
        wait_until(lambda: _each_produced_more(running, before_outage, 200), timeout=120,
                   interval=0.5, what="200 heartbeats queued by each agent during the outage")
        mosquitto.start()
        stored_before = _stored(database_url)
        wait_until(lambda: all(len(_stored(database_url)[d]) > len(stored_before[d]) + 100
                               for d in AGENTS),
                   timeout=120, interval=0.5, what="the outage's backlog flowing again")
        fleet.terminate()  # a fleet worker restart (same worker id: its session waits)
        while_down = _produced(running)
        wait_until(lambda: _each_produced_more(running, while_down, 40), timeout=60,
                   interval=0.5, what="heartbeats produced while the worker is down")
        fleet = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT), database_url)

        produced = _produced(running)

        missing_now: dict = {}

        def all_stored():
            stored = _stored(database_url)
            missing_now.update({d: sorted(set(produced[d]) - set(stored[d])) for d in AGENTS})
            return not any(missing_now.values()) and stored

        try:
            stored = wait_until(all_stored, timeout=180, interval=1, what="the backlog to drain")
        except AssertionError:
            summary = {d: (len(m), m[:3], m[-3:]) for d, m in missing_now.items()}
            raise AssertionError(f"not stored (count, first, last): {summary}") from None
        for device in AGENTS:
            counts = Counter(stored[device])
            doubled = [seq for seq, n in counts.items() if n > 1]
            missing = sorted(set(produced[device]) - set(counts))
            assert missing == [] and doubled == [], (device, missing[:5], doubled[:5])
        beat = fleet.device("sensor-1")["heartbeat"]
        assert beat["outbox_dropped"] == {}  # 64 MB budget: nothing had to be dropped
    finally:
        fleet.terminate()
