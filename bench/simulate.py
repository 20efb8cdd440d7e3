"""Benchmark: the device simulator at fleet scale (500 devices by default).

One ``edge-fleet serve`` (SQLite, its own local broker: the quickstart's set-up) and one
``edge-agent simulate`` process whose devices run the agent's real code. Measured:

* ``register_s``: from the simulator's start until the fleet lists every device online
  with a heartbeat (enrollment, state directories, connections, first heartbeat);
* ``rss_mb_total_idle`` / ``rss_mb_total_serving``: the simulator's RSS once all are
  registered, and once all serve the deployed model (an onnxruntime session each);
* ``rss_mb_per_device_idle`` / ``rss_mb_per_device_serving``: those minus the RSS of the
  same simulator with one device (idle), divided by ``devices - 1``: the marginal cost;
* ``deploy_s``: from ``edge-fleet deploy`` to the fleet seeing every device report the
  new model active (each downloaded, verified and health-checked it itself);
* ``healthy_events``: how many ``healthy`` events the fleet stored (== devices).

Heartbeats every ``--interval`` s (10, the agent's default) with ``--inferences`` (10) on
the active model each. Last line: one JSON object.

    python bench/simulate.py                 # 500 devices
    python bench/simulate.py --devices 5     # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.bundle_build import build_bundle  # noqa: E402
from tests.fixtures.models import build_mlp_onnx  # noqa: E402
from tests.fixtures.processes import console_script, spawn, start_fleet  # noqa: E402
from tests.fixtures.waiting import wait_until  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def simulate(fleet, work: Path, count: int, prefix: str, args) -> object:
    """The simulator, each device with its own account on the fleet's broker."""
    brokers = work / f"brokers-{prefix}json"
    brokers.write_text(json.dumps(fleet.broker_urls(ids_for(prefix, count))))
    return spawn([
        *console_script("edge-agent"), "--log-level", "WARNING", "simulate",
        "--devices", str(count), "--prefix", prefix, "--fleet", fleet.url,
        "--brokers-file", str(brokers),
        "--state-root", str(work / "sim"), "--interval", str(args.interval),
        "--inferences", str(args.inferences), "--threads", "1",
    ], work / f"simulate-{prefix}log", {})


def listed(fleet) -> dict[str, dict]:
    return {d["id"]: d for d in fleet.get("/api/v1/devices").json()}


def all_registered(fleet, ids: list[str]) -> bool:
    devices = listed(fleet)
    return all(devices.get(i, {}).get("online") and devices[i]["heartbeat"] for i in ids)


def ids_for(prefix: str, count: int) -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--inferences", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    figures: dict[str, float | int] = {"devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
        work = Path(tmp)
        fleet = start_fleet(work, None, f"sqlite:///{work / 'fleet.db'}")
        try:
            model_dir = work / "model"
            model_dir.mkdir()
            build_mlp_onnx(model_dir / "model.onnx", seed=0)
            bundle = build_bundle(model_dir / "model.onnx", name="detector", version=1,
                                  out_dir=work / "bundles")
            published = fleet.cli("bundle", "publish", str(bundle.path))
            assert published.returncode == 0, published.stderr

            # The same simulator with one device: the floor the marginal cost is over.
            base = simulate(fleet, work, 1, "base-", args)
            wait_until(lambda: all_registered(fleet, ids_for("base-", 1)), timeout=60,
                       interval=0.2, what="the one-device simulator registered")
            time.sleep(1)  # settle: its first heartbeat and outbox drain
            rss_one = rss_mb(base.process.pid)
            base.terminate(timeout=30)
            figures["rss_mb_one_device"] = round(rss_one, 1)

            ids = ids_for("sim-", args.devices)
            started = time.monotonic()
            sim = simulate(fleet, work, args.devices, "sim-", args)
            try:
                wait_until(lambda: all_registered(fleet, ids), timeout=args.timeout,
                           interval=0.5, what=f"{args.devices} devices registered")
                figures["register_s"] = round(time.monotonic() - started, 2)
                idle = rss_mb(sim.process.pid)
                figures["rss_mb_total_idle"] = round(idle, 1)
                figures["rss_mb_per_device_idle"] = round(
                    (idle - rss_one) / max(args.devices - 1, 1), 3)

                deploy_args = [a for i in ids for a in ("--device", i)]
                deployed_at = time.monotonic()
                done = fleet.cli("deploy", "detector", "--version", "1", *deploy_args)
                assert done.returncode == 0, done.stderr

                def all_serving() -> bool:
                    devices = listed(fleet)
                    return all((devices[i].get("active_model") or {}).get("version") == 1
                               for i in ids)

                wait_until(all_serving, timeout=args.timeout, interval=0.5,
                           what="the deployment on every device")
                figures["deploy_s"] = round(time.monotonic() - deployed_at, 2)
                serving = rss_mb(sim.process.pid)
                figures["rss_mb_total_serving"] = round(serving, 1)
                figures["rss_mb_per_device_serving"] = round(
                    (serving - rss_one) / max(args.devices - 1, 1), 3)
                healthy = 0
                for device_id in ids:
                    healthy += sum(e["event"] == "healthy" for e in fleet.events(device_id))
                figures["healthy_events"] = healthy
            finally:
                code = sim.terminate(timeout=120)
                figures["simulator_exit"] = code
                log = sim.log()
                figures["tracebacks"] = log.count("Traceback")
        finally:
            fleet.terminate()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
