"""``edge-agent simulate``: its options (imported by the CLI's parser: nothing heavy here)
and the command body.

Brokers: every device connects with its own client id (``edgefleet-agent-<id>``) and its
own Last Will. Where the broker binds client ids to accounts (production, with
``deploy/mosquitto``), give each device its credentials in ``--brokers-file``, a JSON
object ``{"sim-0001": "mqtt://sim-0001:PASSWORD@broker:1883", ...}`` (devices it does not
name use ``--broker``). ``--broker`` may contain ``{device_id}``, replaced per device. An
open broker (the quickstart's) needs ``--broker`` only, or nothing: the fleet names its
broker at ``GET /api/v1/device-config``, as at enrollment.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.runtime import EngineOptions

__all__ = ["add_arguments", "run_from_args"]

log = logging.getLogger(__name__)


def add_arguments(command: argparse.ArgumentParser, state_dir_default: Path) -> None:
    command.add_argument("--devices", type=int, required=True, help="how many devices")
    command.add_argument("--fleet", required=True,
                         help="fleet URL: each device enrolls with it once, fetches from it")
    command.add_argument(
        "--broker",
        help="mqtt://[user[:pass]@]HOST:PORT for every device; {device_id} is replaced per "
        "device (default: the broker the fleet names, else mqtt://127.0.0.1:1883)")
    command.add_argument(
        "--brokers-file", type=Path,
        help="JSON object device id -> broker URL with that device's credentials "
        "(for a broker that binds client ids to accounts)")
    command.add_argument("--state-root", type=Path,
                         default=state_dir_default.with_name(state_dir_default.name + "-sim"),
                         help="one state directory per device under this (default "
                         "%(default)s); kept across runs, like a device's disk")
    command.add_argument("--prefix", default="sim-",
                         help="device ids are PREFIX0001... (default sim-)")
    command.add_argument("--interval", type=float, default=10.0,
                         help="seconds between heartbeats (default 10)")
    command.add_argument("--keepalive", type=int, default=15,
                         help="MQTT keepalive seconds (default 15)")
    command.add_argument("--reconnect-jitter", choices=("on", "off"), default="on",
                         help="draw each device's reconnect delays at random over their "
                         "backoff window (default on; off: all retry in step, for comparison)")
    command.add_argument("--drift-window", type=float, default=300.0,
                         help="seconds per drift window (default 300)")
    command.add_argument("--inferences", type=int, default=10,
                         help="synthetic inferences per device per interval on its active "
                         "model (default 10)")
    command.add_argument("--load-threads", type=int, default=4,
                         help="threads running every device's interval work (default 4)")
    command.add_argument("--start-rate", type=float, default=100.0,
                         help="devices started per second (default 100)")
    command.add_argument("--restart-delay", type=float, default=1.0,
                         help="seconds a crashed device stays down (default 1)")
    command.add_argument("--retry", type=float, default=5.0,
                         help="first retry delay of a failed install, seconds (default 5)")
    command.add_argument("--faults", type=Path,
                         help="JSON fault file, re-read when it changes (see "
                         "agent/simulate/faults.py)")
    command.add_argument("--fail-health-check", action="store_true",
                         help="every device fails every install's health check")
    command.add_argument("--latency-ms", type=float, default=0.0,
                         help="latency added to every inference (default 0)")
    command.add_argument("--error-rate", type=float, default=0.0,
                         help="share of inferences raising a model error (default 0)")
    command.add_argument("--client-error-rate", type=float, default=0.0,
                         help="share of synthetic requests sent malformed, refused as "
                         "client errors (default 0)")
    command.add_argument("--crash-after-install", action="store_true",
                         help="every device crashes after each install, then restarts")


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_from_args(args: argparse.Namespace, engine: EngineOptions, labels: dict[str, str]) -> int:
    from agent.contract import is_valid_device_id
    from agent.mqtt import BrokerAddress
    from agent.simulate.faults import DeviceFaults
    from agent.simulate.runner import SimulationConfig, Simulator, device_ids

    if args.devices < 1:
        return _usage("--devices must be at least 1")
    for name in ("interval", "start_rate", "load_threads", "drift_window"):
        if getattr(args, name) <= 0:
            return _usage(f"--{name.replace('_', '-')} must be greater than 0")
    if args.inferences < 0 or args.restart_delay < 0 or args.retry <= 0:
        return _usage("--inferences and --restart-delay must be >= 0, --retry > 0")
    if (not 0 <= args.error_rate <= 1 or not 0 <= args.client_error_rate <= 1
            or args.latency_ms < 0):
        return _usage("--error-rate and --client-error-rate must be in 0..1 and "
                      "--latency-ms >= 0")
    fleet = args.fleet.rstrip("/")
    if not fleet.startswith(("http://", "https://")):
        return _usage(f"--fleet {args.fleet!r}: expected http://HOST:PORT or https://…")
    ids = device_ids(args.prefix, args.devices)
    for device_id in (ids[0], ids[-1]):
        if not is_valid_device_id(device_id):
            return _usage(f"--prefix {args.prefix!r}: {device_id!r} is not a valid device id")
    per_device: dict[str, str] = {}
    if args.brokers_file is not None:
        try:
            per_device = json.loads(args.brokers_file.read_text())
        except (OSError, ValueError) as exc:
            return _usage(f"--brokers-file {args.brokers_file}: {exc}")
        if not isinstance(per_device, dict) or not all(
            isinstance(v, str) for v in per_device.values()
        ):
            return _usage(f"--brokers-file {args.brokers_file}: expected an object of URLs")
    template = args.broker
    if template is None and len(per_device) < len(ids):
        from agent.trust.client import fetch_device_broker

        try:
            template = fetch_device_broker(fleet)
        except ValueError as exc:
            log.warning("the fleet names no usable broker (%s)", exc)
        template = template or "mqtt://127.0.0.1:1883"
        log.info("devices without --brokers-file entries use %s", template)
    brokers = {}
    for device_id in ids:
        url = per_device.get(device_id) or (template or "").replace("{device_id}", device_id)
        try:
            brokers[device_id] = BrokerAddress.parse(url)
        except ValueError as exc:
            return _usage(f"{device_id}: {exc}")
    simulator = Simulator(SimulationConfig(
        devices=args.devices,
        fleet_url=fleet,
        state_root=args.state_root,
        brokers=brokers,
        prefix=args.prefix,
        interval_s=args.interval,
        keepalive_s=args.keepalive,
        reconnect_jitter=args.reconnect_jitter == "on",
        drift_window_s=args.drift_window,
        inferences=args.inferences,
        load_threads=args.load_threads,
        restart_delay_s=args.restart_delay,
        start_rate=args.start_rate,
        labels=labels,
        engine=engine,
        faults_path=args.faults,
        flag_faults=DeviceFaults(
            fail_health_check=args.fail_health_check, latency_ms=args.latency_ms,
            error_rate=args.error_rate, client_error_rate=args.client_error_rate,
            crash_after_install=args.crash_after_install,
        ),
        retry_initial_s=args.retry,
    ))
    # 500 devices' lines interleave: each says whose it is (thread names carry the id).
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: simulator.stop())
    from agent.errors import TrustError

    try:
        simulator.run()
    except (OSError, TrustError) as exc:  # state root not writable, fleet unreachable, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
