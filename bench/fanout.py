"""Benchmark: fanning a deployment out to many devices, and judging a wave's gates.

In one run, against a real mosquitto (open, loopback) and a real database:

* ``floor_per_s``: the bare floor, signing each device's desired state with the director
  key and publishing it retained at QoS 1 until every PUBACK is in: no database, no
  generation bookkeeping;
* ``desired_per_s``: ``fleet.deployments.assign`` for all devices (generation allocated
  under a row lock, signed, stored with its payload, one audit entry, published, counted),
  through the fleet's MQTT link, until every PUBACK is in; ``fanout_vs_floor`` is the
  ratio (goal for 10,000 devices: ``desired_per_s`` >= 5,000);
* ``gate_eval_10k_s``: evaluating every gate over a 10,000-device wave (goal < 0.5 s);
* ``sim_rss_mb_per_device_idle`` / ``_serving``: the device simulator's memory per device,
  from ``bench/simulate.py --devices N`` run beside (``--sim-devices``, default 100; 0
  leaves it out), which the rollout tests and the load benchmarks run on.

Last line: one JSON object.

    python bench/fanout.py                  # 10,000 devices, SQLite
    python bench/fanout.py --devices 500    # quick
    python bench/fanout.py --postgres       # a fresh PostgreSQL database, dropped after
    python bench/fanout.py --sim-devices 500  # the simulator's RSS at 500 devices
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _device_ids(count: int) -> list[str]:
    return [f"fan-{index:06d}" for index in range(count)]


def _connected_link(url: str):
    from agent.mqtt import BrokerAddress, MqttLink

    link = MqttLink(BrokerAddress.parse(url), client_id=f"bench-{uuid.uuid4().hex[:8]}",
                    on_message=lambda message: None)
    link.start()
    if not link.wait_connected(15):
        raise SystemExit(f"cannot connect to {url}")
    return link


class Acks:
    """Publishes through the link and waits until the broker acknowledged all of them."""

    def __init__(self, link) -> None:
        self.link = link
        self.infos: list = []
        self._lock = threading.Lock()

    def __call__(self, topic_name: str, payload: bytes) -> None:
        info = self.link.publish(topic_name, payload, qos=1, retain=True)
        with self._lock:
            self.infos.append(info)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise SystemExit("the broker did not acknowledge every desired state")


def measure_floor(url: str, signer, device_ids: list[str]) -> float:
    from agent.contract import BundleRef, DesiredState, topic, utcnow
    from fleet.trust.director import sign_desired

    link = _connected_link(url)
    acks = Acks(link)
    bundle = BundleRef(name="floor", version=1)
    started = time.perf_counter()
    for device_id in device_ids:
        desired = DesiredState(device_id=device_id, generation=1, bundle=bundle,
                               issued_at=utcnow())
        acks(topic(device_id, "desired"), sign_desired(desired, signer))
    acks.wait()
    elapsed = time.perf_counter() - started
    link.close()
    return len(device_ids) / elapsed


def measure_fanout(url: str, database_url: str, repository, device_ids: list[str]) -> float:
    from sqlmodel import Session

    from agent.contract import BundleRef
    from fleet import deployments
    from fleet.db import init_db, make_engine
    from fleet.models import Bundle, Device

    engine = make_engine(database_url)
    init_db(engine)
    with Session(engine) as session:
        session.add(Bundle(name="fan", version=1, target_name="fan-1.bundle",
                           sha256="0" * 64, size=1, runtime="onnx", manifest={}))
        session.add_all(Device(id=device_id) for device_id in device_ids)
        session.commit()
    link = _connected_link(url)
    acks = Acks(link)
    signer = repository.online_signer("director")
    started = time.perf_counter()
    with Session(engine) as session:
        deployments.assign(session, signer, acks, BundleRef(name="fan", version=1),
                           device_ids, issued_by="bench")
    acks.wait()
    elapsed = time.perf_counter() - started
    link.close()
    engine.dispose()
    return len(device_ids) / elapsed


def measure_gates(count: int) -> float:
    from fleet.rollouts.gates import DeviceFigures, GatePolicy, evaluate

    wave = [DeviceFigures(f"d{i}", installed=i % 50 != 0, failed=i % 50 == 0,
                          inferences=500 + i % 7, model_errors=i % 3, client_errors=i % 5,
                          latency_p95_before=1.0 + (i % 10) / 100,
                          latency_p95_after=1.1 + (i % 13) / 100, went_offline=i % 97 == 0)
            for i in range(count)]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        evaluate(wave, GatePolicy(), bake_over=True)
        best = min(best, time.perf_counter() - started)
    return best


def measure_simulator(devices: int) -> dict:
    """The simulator's RSS per device, from bench/simulate.py's own run (its fleet, broker
    and devices), so this benchmark states what the simulated fleets it gates cost."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("simulate.py")), "--devices",
         str(devices), "--interval", "5"], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench/simulate.py failed:\n{done.stderr[-2000:]}")
    simulated = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"simulator, {devices} devices: {simulated['rss_mb_per_device_idle']} MB per "
          f"idle device, {simulated['rss_mb_per_device_serving']} MB serving")
    return {"sim_devices": devices,
            "sim_rss_mb_per_device_idle": simulated["rss_mb_per_device_idle"],
            "sim_rss_mb_per_device_serving": simulated["rss_mb_per_device_serving"]}


@contextmanager
def _database(postgres: bool, work: Path) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{work / 'fleet.db'}"
        return
    import psycopg

    admin_url = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"edgefleet_fanout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.rpartition("/")[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices to fan out to")
    parser.add_argument("--postgres", action="store_true",
                        help="a fresh database on EDGEFLEET_TEST_PG_URL's server "
                             "(default: a fresh SQLite file)")
    parser.add_argument("--sim-devices", type=int, default=100,
                        help="simulated devices for the simulator's RSS per device "
                             "(bench/simulate.py; 0: leave it out)")
    args = parser.parse_args()

    from fleet.local_broker import LocalBroker
    from fleet.trust.repository import FleetRepository

    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        repository = FleetRepository(work / "data")
        repository.init()
        device_ids = _device_ids(args.devices)
        with _database(args.postgres, work) as database_url, \
                LocalBroker(work / "broker", persistence=False) as broker:
            floor = measure_floor(broker.url, repository.online_signer("director"),
                                  device_ids)
            fanout = measure_fanout(broker.url, database_url, repository, device_ids)
    gates_s = measure_gates(10_000)
    figures = {
        "devices": args.devices,
        "database": "postgresql" if args.postgres else "sqlite",
        "floor_per_s": round(floor),
        "desired_per_s": round(fanout),
        "fanout_vs_floor": round(fanout / floor, 3),
        "fanout_s": round(args.devices / fanout, 3),
        "gate_eval_10k_s": round(gates_s, 4),
    }
    if args.sim_devices:
        figures.update(measure_simulator(args.sim_devices))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
