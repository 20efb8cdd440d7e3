"""A full outbox with the broker away: the agent keeps serving inference, stays within its
disk budget, drops heartbeats (counted) before events, and delivers what it kept.

Real agent process with a 1 MB outbox and heartbeats every 2 ms, real stopped-then-started
mosquitto (production ACL), real fleet, real onnxruntime behind the local endpoint.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

from agent.bundle import extract_bundle
from agent.slots import Slots
from tests.fixtures.broker import FLEET_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until

BUDGET = 1024 * 1024


def _outbox(state_dir) -> tuple[int, dict[str, int]]:
    """What the agent's outbox holds, read from its SQLite file (WAL: readers don't block)."""
    if not (state_dir / "outbox.db").exists():
        return 0, {}
    db = sqlite3.connect(state_dir / "outbox.db", timeout=5)
    try:
        size = db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0]
        drops = dict(db.execute("SELECT what, count FROM outbox_drops").fetchall())
    finally:
        db.close()
    return size, drops


@pytest.fixture
def fleet_server(tmp_path, mosquitto):
    """SQLite only: the database plays no part in what this test checks."""
    server = start_fleet(
        tmp_path, mosquitto.url_for(FLEET_ACCOUNT), f"sqlite:///{tmp_path / 'fleet.db'}"
    )
    yield server
    server.terminate()


def test_full_outbox_keeps_budget_and_inference_and_events(
    fleet_server, mosquitto, agents, make_bundle
):
    state_dir = agents.state_dir("edge-full")
    slots = Slots(state_dir)
    extract_bundle(make_bundle(version=1).path, slots.path("a"), 1 << 26)
    slots.activate("a")  # a model is installed: the agent serves it from the start
    broker_url = mosquitto.url_for("edge-full")
    mosquitto.stop()

    agent = agents.start(
        "edge-full", broker_url, interval=0.002, extra_args=("--outbox-mb", "1")
    )
    failures: list[int] = []
    served = [0]
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=agent.endpoint, timeout=5) as http:
            while not stop.is_set():
                try:
                    code = http.post("/v1/infer", json={"inputs": [[0.1] * 4]}).status_code
                except httpx.HTTPError:
                    code = -1
                if code == 200:
                    served[0] += 1
                elif served[0]:  # failures before the endpoint first answered don't count
                    failures.append(code)
                time.sleep(0.01)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        def dropping():
            size, drops = _outbox(state_dir)
            assert size <= BUDGET, f"outbox holds {size} bytes, budget {BUDGET}"
            return drops.get("telemetry", 0) > 100

        wait_until(dropping, timeout=60, interval=0.5, what="the outbox to overflow")
        _, drops = _outbox(state_dir)
        assert "events" not in drops, "events are dropped last"
    finally:
        stop.set()
        thread.join(10)
    assert failures == [] and served[0] > 100, (failures[:5], served[0])

    mosquitto.start()
    events = wait_until(
        lambda: [e["event"] for e in fleet_server.events("edge-full")] or None,
        timeout=30, what="the kept backlog to arrive",
    )
    assert events[0] == "started", "the start-up event survived the flood of heartbeats"
    def drops_reported() -> int:
        device = fleet_server.device("edge-full")
        beat = (device or {}).get("heartbeat") or {}
        return (beat.get("outbox_dropped") or {}).get("telemetry", 0)

    # Heartbeats arrive in seq order; the later ones carry the larger drop counts.
    wait_until(lambda: drops_reported() > 100, timeout=30, what="heartbeats reporting drops")
