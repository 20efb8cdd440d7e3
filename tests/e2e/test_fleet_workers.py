"""Two fleet workers on one PostgreSQL, one broker and one shared store: the leader is
SIGKILLed during a rollout and a telemetry burst, then the follower; nothing is lost or
doubled, the rollout completes, and the leader role moves when its holder dies.

All real: two ``edge-fleet serve`` processes (``EDGEFLEET_INGEST_SHARED``: the broker
splits telemetry between them through a shared subscription; ``EDGEFLEET_STORE_DIR``: one
update repository), the production broker configuration, ``edge-agent simulate`` running
the agent's code for the rollout's devices, and burst devices publishing heartbeats and
events with known sequence numbers through their own broker accounts, so "lost" and
"doubled" are counted row by row in the database. The killed worker is started again
with its worker id, as a compose restart policy or a Kubernetes StatefulSet would: what
the broker held for its session (sent to it, never acknowledged) is stored then.
"""

from __future__ import annotations

import threading
from collections import Counter

import psycopg
import pytest

from agent.contract import EventMessage, HeartbeatTelemetry, encode, topic, utcnow
from tests.fixtures.broker import RawClient, fleet_account
from tests.fixtures.processes import start_fleet
from tests.fixtures.rollouts import (
    create_rollout,
    devices_by_id,
    received,
    rollout_audit,
    rollout_ended,
    rollout_status,
    told_of,
)
from tests.fixtures.simulator import publish_versions, start_simulator
from tests.fixtures.waiting import wait_until

SIMULATED = [f"sim-{index:04d}" for index in range(1, 21)]
BURST = [f"burst-{index:02d}" for index in range(1, 9)]
PER_DEVICE = 150  # heartbeats and events alternating: 75 of each per burst device


@pytest.fixture
def database_url(postgres_url) -> str:
    """PostgreSQL only: several workers need its advisory locks and row locks."""
    return postgres_url


def _worker(tmp_path, mosquitto, database_url, name: str, port: int | None = None):
    return start_fleet(
        tmp_path, mosquitto.url_for(fleet_account(name)), database_url, name=name, port=port,
        publisher_broker_url=mosquitto.url_for(fleet_account(f"{name}-publisher")),
        extra_env={"EDGEFLEET_INGEST_SHARED": "true",
                   "EDGEFLEET_STORE_DIR": str(tmp_path / "store")})


def _leads(worker) -> bool:
    try:
        return worker.get("/healthz").json()["leader"] is True
    except Exception:  # a worker being killed or started does not answer
        return False


class Burst:
    """Burst devices, each on its own broker account, sending heartbeats and events with
    seq 1..PER_DEVICE as fast as the broker acknowledges them (QoS 1)."""

    def __init__(self, mosquitto) -> None:
        self.clients = {device: RawClient(mosquitto.url_for(device)) for device in BURST}
        self.sent = Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._send, args=(device,), daemon=True)
                        for device in BURST]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _send(self, device: str) -> None:
        client = self.clients[device]
        try:
            for seq in range(1, PER_DEVICE + 1):
                if seq % 2:
                    message = HeartbeatTelemetry(
                        device_id=device, seq=seq, sent_at=utcnow(), uptime_s=float(seq),
                        cpu_percent=5.0, rss_mb=40.0, inference_count=seq, error_count=0,
                        latency_ms_p50=1.0, latency_ms_p95=2.0)
                    client.publish(topic(device, "telemetry"), encode(message))
                else:
                    event = EventMessage(device_id=device, seq=seq, sent_at=utcnow(),
                                         event="burst", detail={"n": seq})
                    client.publish(topic(device, "events"), encode(event))
                self.sent[device] += 1
        except Exception as exc:
            self.errors.append(f"{device}: {exc!r}")

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)
        for client in self.clients.values():
            client.close()


def _stored(database_url: str) -> dict[str, list[tuple[str, int, int]]]:
    """Per table: (device, rows, distinct seqs) of the burst devices."""
    with psycopg.connect(database_url) as connection:
        return {
            table: connection.execute(
                f"SELECT device_id, count(*), count(DISTINCT seq) FROM {table} "
                "WHERE device_id LIKE 'burst-%' GROUP BY device_id ORDER BY device_id"
            ).fetchall()
            for table in ("heartbeat", "deviceevent")
        }


def _complete(database_url: str) -> bool:
    expected = [(device, PER_DEVICE // 2, PER_DEVICE // 2) for device in BURST]
    stored = _stored(database_url)
    return stored["heartbeat"] == expected and stored["deviceevent"] == expected


@pytest.mark.timeout(900)
@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_a_worker_killed_during_a_rollout_and_a_burst_loses_and_doubles_nothing(
    tmp_path, mosquitto, make_bundle, database_url, victim
):
    a = _worker(tmp_path, mosquitto, database_url, "a")
    wait_until(lambda: _leads(a), timeout=30, what="the first worker to lead")
    b = _worker(tmp_path, mosquitto, database_url, "b")
    b.token = a.token  # one admin token for the fleet, whichever worker answers
    workers = {"a": a, "b": b}
    # The devices reach the fleet's HTTP side through the worker that stays up.
    doomed, survivor = ("a", b) if victim == "leader" else ("b", a)
    sim = None
    try:
        assert not _leads(b)
        assert b.get("/healthz").json()["worker"] == "test-b"
        # Published through one worker, served by the other: the store is shared.
        publish_versions(a, make_bundle, ((1, 1), (2, 2)))
        assert b.get("/repo/metadata/timestamp.json").status_code == 200

        sim, _faults = start_simulator(
            tmp_path, survivor.url, mosquitto, SIMULATED, {"devices": {}}, "--interval",
            "0.5", "--keepalive", "5", "--inferences", "2", "--retry", "2")
        wait_until(lambda: sum(d["online"] for d in devices_by_id(survivor).values())
                   == len(SIMULATED), timeout=120, interval=1, what="the devices online")

        rollout = create_rollout(survivor, 1, "--waves", "5,100%", "--bake", "2")

        def first_wave_healthy() -> bool:
            status = rollout_status(survivor, rollout["id"])
            return status["wave"] >= 1 and bool(status["waves"][0]["states"].get("healthy"))

        wait_until(first_wave_healthy, timeout=120, interval=0.2,
                   what="the first wave's devices healthy")

        burst = Burst(mosquitto)
        burst.start()
        wait_until(lambda: sum(burst.sent.values()) >= len(BURST) * PER_DEVICE // 4,
                   timeout=60, interval=0.05, what="a quarter of the burst sent")
        assert rollout_status(survivor, rollout["id"])["status"] == "running"
        workers[doomed].kill9()  # mid-rollout, mid-burst
        wait_until(lambda: _leads(survivor), timeout=30, interval=0.2,
                   what="the survivor to lead")
        burst.join()
        assert not burst.errors, burst.errors
        assert sum(burst.sent.values()) == len(BURST) * PER_DEVICE

        # Started again with its id, as a restart policy would: it rejoins as a follower
        # and stores what the broker kept for its session.
        back = workers[doomed] = _worker(tmp_path, mosquitto, database_url, doomed)
        back.token = a.token
        assert not _leads(back) and _leads(survivor)

        wait_until(lambda: _complete(database_url), timeout=120, interval=1,
                   what=f"every burst message stored once: {_stored(database_url)}")
        stored = _stored(database_url)
        assert all(rows == distinct for _, rows, distinct in
                   stored["heartbeat"] + stored["deviceevent"]), stored

        done = rollout_ended(survivor, rollout["id"], timeout=300)
        assert done["status"] == "completed", done
        assert all(w["states"] == {"healthy": w["devices"]} for w in done["waves"]), done
        told = told_of(survivor, 1)
        assert told == Counter(dict.fromkeys(SIMULATED, 1)), told
        # The devices' own word: each received it once. Their events are split between
        # the workers like the rest of the stream, so an early event stored by one worker
        # may land after the later `healthy` the other stored (the rollout moved on it).
        seen: list[Counter] = []

        def each_received_once() -> bool:
            seen.append(Counter({d: received(survivor, d, 1) for d in SIMULATED}))
            return seen[-1] == Counter(dict.fromkeys(SIMULATED, 1))

        try:
            wait_until(each_received_once, timeout=60, interval=1,
                       what="each device's desired_received event, once")
        except AssertionError:
            raise AssertionError(f"desired_received per device: {seen[-1]}") from None
        actions = [e["action"] for e in rollout_audit(survivor, rollout["id"])]
        assert actions.count("rollout.complete") == 1, actions
        if victim == "leader":
            assert "leader: worker test-b runs the fleet's chores now" in b.log()
    finally:
        if sim is not None:
            sim.terminate(timeout=60)
        for worker in workers.values():
            worker.terminate()
