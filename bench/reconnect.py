"""Benchmark: a reconnect storm. 500 simulated devices (by default) on one broker, the
broker restarted; how fast they are all back, and how hard they hit the broker doing so.

A private Mosquitto with the production configuration (``deploy/mosquitto``), one
``edge-fleet serve`` (SQLite) on it, and ``edge-agent simulate`` with one broker account
per device. Once every device is connected, the broker is stopped and started again at
once; each device notices the lost connection and reconnects by its backoff
(:class:`agent.mqtt.Backoff`). Measured from the broker's own log (one line per accepted
connection, stamped in whole seconds), for each setting of ``--reconnect-jitter``:

* ``all_online_s``: from the broker's restart until the last device's connection was
  accepted (the log's seconds: up to 1 s more than the truth, never less);
* ``peak_connects_per_s``: the most device connections the broker accepted in one second;
* ``peak_share``: that peak over the fleet's size (the goal: at most 0.2, every device
  back within 30 s, with jitter on).

Both runs use the same state directories (enrolled once) and the same broker. Last line:
one JSON object, ``jitter_on`` and ``jitter_off`` side by side.

    python bench/reconnect.py                 # 500 devices
    python bench/reconnect.py --devices 30    # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.simulate import ids_for  # noqa: E402
from fleet.broker.dynsec import DynsecAccounts  # noqa: E402
from fleet.local_broker import LocalBroker  # noqa: E402
from tests.fixtures.broker import DEPLOY_DIR, FLEET_ACCOUNT, PUBLISHER_ACCOUNT  # noqa: E402
from tests.fixtures.processes import console_script, spawn, start_fleet  # noqa: E402
from tests.fixtures.waiting import wait_until  # noqa: E402

CONNECTED = re.compile(r"^(\d+): New client connected from \S+ as edgefleet-agent-(\S+) ")


def connects(broker: LocalBroker, since: float) -> list[tuple[int, str]]:
    """(second, device id) of every device connection the broker accepted from ``since``
    (a wall-clock time) on."""
    found = []
    for line in broker.log_path.read_text(errors="replace").splitlines():
        matched = CONNECTED.match(line)
        if matched and int(matched.group(1)) >= int(since):
            found.append((int(matched.group(1)), matched.group(2)))
    return found


def all_connected(broker: LocalBroker, since: float, ids: list[str]) -> bool:
    return {device for _, device in connects(broker, since)} >= set(ids)


def storm(broker: LocalBroker, fleet, work: Path, ids: list[str], jitter: str,
          args) -> dict[str, float | int | None]:
    """One run: the simulator up and connected, the broker restarted, the storm measured."""
    brokers = work / "brokers.json"
    started = time.time()
    sim = spawn([
        *console_script("edge-agent"), "--log-level", "WARNING", "simulate",
        "--devices", str(len(ids)), "--prefix", "sim-", "--fleet", fleet.url,
        "--brokers-file", str(brokers), "--state-root", str(work / "sim"),
        "--interval", str(args.interval), "--inferences", "0", "--threads", "1",
        "--keepalive", str(args.keepalive), "--reconnect-jitter", jitter,
    ], work / f"simulate-jitter-{jitter}.log", {})
    figures: dict[str, float | int | None] = {}
    try:
        wait_until(lambda: all_connected(broker, started, ids), timeout=args.timeout,
                   interval=0.5, what=f"{len(ids)} devices connected")
        # A new second, so that the restart's connections are the only ones after it.
        time.sleep(1.1 - time.time() % 1)
        broker.stop()
        restarted = time.time()
        broker.start()

        def back() -> bool:
            return all_connected(broker, restarted, ids)

        with contextlib.suppress(AssertionError):  # reported as all_online_s None
            wait_until(back, timeout=args.timeout, interval=0.5,
                       what=f"{len(ids)} devices back after the restart")
        after = connects(broker, restarted)
        per_second = Counter(second for second, _ in after)
        first = {}
        for second, device in after:
            first.setdefault(device, second)
        complete = set(first) >= set(ids)
        figures["all_online_s"] = (round(max(first.values()) + 1 - restarted, 1)
                                   if complete else None)
        figures["peak_connects_per_s"] = max(per_second.values(), default=0)
        figures["peak_share"] = round(figures["peak_connects_per_s"] / len(ids), 3)
        figures["seconds_with_connects"] = len(per_second)
        figures["connects"] = len(after)  # more than the devices: retries that got in twice
    finally:
        figures["simulator_exit"] = sim.terminate(timeout=120)
        figures["tracebacks"] = sim.log().count("Traceback")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--keepalive", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    figures: dict[str, object] = {"devices": args.devices, "keepalive": args.keepalive}
    ids = ids_for("sim-", args.devices)
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        work = Path(tmp)
        broker = LocalBroker(work / "broker", deploy_dir=DEPLOY_DIR).start()
        try:
            fleet = start_fleet(work, broker.url_for(FLEET_ACCOUNT),
                                f"sqlite:///{work / 'fleet.db'}",
                                publisher_broker_url=broker.url_for(PUBLISHER_ACCOUNT))
            try:
                admin = broker.admin_address()
                made = DynsecAccounts(admin).add_devices(ids)
                (work / "brokers.json").write_text(json.dumps(
                    {i: admin.with_account(i, made[i]).url() for i in ids}))
                for jitter in ("on", "off"):
                    figures[f"jitter_{jitter}"] = storm(broker, fleet, work, ids, jitter, args)
            finally:
                fleet.terminate()
        finally:
            broker.stop()
    on = figures["jitter_on"]
    figures["goal_met"] = bool(
        isinstance(on, dict) and on["all_online_s"] is not None and on["all_online_s"] <= 30
        and on["peak_share"] <= 0.2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
