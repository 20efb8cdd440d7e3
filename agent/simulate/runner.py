"""Many simulated devices in one process: start them, drive their clocks, apply faults.

Per device (nothing shared that would change what a device does): its id, state directory,
broker connection (own client id, own Last Will, own credentials when given), SQLite state
and outbox, TUF metadata and download directory, slots, engines (an ONNX Runtime session
per device: each device health-checks and serves the bytes it installed itself), and the
daemon's own threads (MQTT network, desired-state intake, reconciler, outbox drainer).

Shared by all, because a process has one of each anyway: the Python runtime, imported
libraries (onnxruntime, TUF, paho), and the clock: one scheduler thread replaces each
daemon's main loop, handing every device's heartbeat interval (synthetic load, then the
heartbeat) to a small pool (``--load-threads``), plus the fault file watch. There is no
inference endpoint and no control socket per device.

What is deliberately *not* shared: downloads (each device fetches and verifies its own
copy over HTTP, so the fleet's repository sees the real load and every device's TUF path
runs) and ONNX Runtime sessions (each device's health check and latency figures are its
own). Memory per device is then mostly its session and its threads; see bench/simulate.py.
"""

from __future__ import annotations

import functools
import heapq
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.daemon import AgentConfig
from agent.mqtt import BrokerAddress
from agent.runtime import EngineOptions
from agent.simulate.device import SimDevice, SimulatedCrash
from agent.simulate.faults import DeviceFaults, FaultWatch
from agent.state import is_enrolled

__all__ = ["SimulationConfig", "Simulator", "device_ids"]

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0


def device_ids(prefix: str, count: int) -> list[str]:
    """``sim-0001`` .. ``sim-0500``: zero-padded, so they sort as numbered."""
    width = max(4, len(str(count)))
    return [f"{prefix}{index:0{width}d}" for index in range(1, count + 1)]


@dataclass(frozen=True)
class SimulationConfig:
    devices: int
    fleet_url: str
    state_root: Path
    brokers: dict[str, BrokerAddress]  # per device id
    prefix: str = "sim-"
    interval_s: float = 10.0
    keepalive_s: int = 15
    reconnect_jitter: bool = True
    drift_window_s: float = 300.0
    inferences: int = 10  # synthetic load per heartbeat interval
    load_threads: int = 4
    restart_delay_s: float = 1.0
    start_rate: float = 100.0  # devices started per second
    labels: dict[str, str] | None = None
    engine: EngineOptions = field(default_factory=lambda: EngineOptions(threads=1))
    faults_path: Path | None = None
    flag_faults: DeviceFaults = field(default_factory=DeviceFaults)
    retry_initial_s: float = 5.0


def _quiet_crashes(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SimulatedCrash:
        return  # the thread of a simulated crash: ended on purpose
    _default_hook(args)


_default_hook = threading.excepthook


class Simulator:
    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.watch = FaultWatch(config.faults_path, config.flag_faults)
        self.watch.poll()
        self.devices: list[SimDevice] = []
        self._pool = ThreadPoolExecutor(config.load_threads, thread_name_prefix="sim-load")
        self._crashed: list[SimDevice] = []
        self._crash_lock = threading.Lock()
        self._stop = threading.Event()
        self._clock = threading.Thread(target=self._clock_loop, name="sim-clock", daemon=True)
        self.started_s: float | None = None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Enroll (once per state directory) and start every device, at ``start_rate``."""
        threading.excepthook = _quiet_crashes
        config = self.config
        began = time.monotonic()
        for index, device_id in enumerate(device_ids(config.prefix, config.devices)):
            if self._stop.is_set():
                return
            state_dir = config.state_root / device_id
            if not is_enrolled(state_dir):
                from agent.trust.client import enroll

                enroll(config.fleet_url, state_dir / "tuf")
            agent_config = AgentConfig(
                broker=config.brokers[device_id],
                device_id=device_id,
                state_dir=state_dir,
                interval_s=config.interval_s,
                keepalive_s=config.keepalive_s,
                reconnect_jitter=config.reconnect_jitter,
                drift_window_s=config.drift_window_s,
                fleet_url=config.fleet_url,
                listen=None,
                socket_path=None,
                engine=config.engine,
                broker_source="edge-agent simulate",
                labels=dict(config.labels or {}),
                control_socket=False,
                retry_initial_s=config.retry_initial_s,
            )
            device = SimDevice(agent_config, functools.partial(self.watch.faults_for, device_id),
                               on_crash=self._crashed_now, base_labels=dict(config.labels or {}))
            device.start()
            self.devices.append(device)
            wait = began + (index + 1) / config.start_rate - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
        self.started_s = time.monotonic() - began
        log.info("simulating %d devices (started in %.1f s)", len(self.devices), self.started_s)

    def run(self) -> None:
        """Start the clock and the devices; block until :meth:`stop`; stop them all."""
        self._clock.start()
        try:
            self.start()
            self._stop.wait()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self._clock.is_alive():
            self._clock.join(timeout=10)
        stops = [self._pool.submit(device.stop) for device in self.devices]
        for done in stops:
            try:
                done.result(timeout=30)
            except Exception:
                log.exception("a simulated device did not stop cleanly")
        self._pool.shutdown(wait=True, cancel_futures=True)
        log.info("simulator stopped")

    # ------------------------------------------------------------------ the clock

    def _crashed_now(self, device: SimDevice) -> None:
        with self._crash_lock:
            self._crashed.append(device)

    def _clock_loop(self) -> None:
        """Heartbeats for every device at its interval (first one at a random phase, so
        500 devices do not beat in step), crash restarts, fault file changes."""
        due: list[tuple[float, int]] = []
        known = 0
        next_poll = 0.0
        next_summary = time.monotonic() + SUMMARY_EVERY_S
        interval = self.config.interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            while known < len(self.devices):  # devices started since the last turn
                heapq.heappush(due, (now + random.uniform(0, interval), known))
                known += 1
            if now >= next_poll:
                next_poll = now + 0.5
                if self.watch.poll():
                    for device in self.devices[:known]:
                        device.apply()
            with self._crash_lock:
                crashed, self._crashed = self._crashed, []
            for device in crashed:
                self._pool.submit(self._restart, device)
            while due and due[0][0] <= now:
                _, index = heapq.heappop(due)
                heapq.heappush(due, (now + interval, index))
                self._pool.submit(self._beat, self.devices[index])
            if now >= next_summary:
                next_summary = now + SUMMARY_EVERY_S
                log.info("%s", self.summary())
            wait = min(due[0][0] - now if due else 0.1, 0.1)
            self._stop.wait(max(wait, 0.005))

    def summary(self) -> str:
        """One line: how many devices are connected, serving, offline, crashed so far."""
        devices = list(self.devices)
        connected = sum(1 for d in devices if d.daemon is not None and d.daemon.link.connected)
        serving = sum(1 for d in devices if d.daemon is not None and d.daemon.host.current)
        offline = sum(1 for d in devices if d.offline)
        crashes = sum(d.crashes for d in devices)
        return (f"{len(devices)}/{self.config.devices} devices started, {connected} connected, "
                f"{serving} serving a model, {offline} offline on purpose, {crashes} crash(es)")

    def _beat(self, device: SimDevice) -> None:
        if not device.busy.acquire(blocking=False):
            return  # the last interval's work is still running: skip, never pile up
        try:
            device.beat(self.config.inferences)
        except Exception:
            log.exception("%s: heartbeat failed", device.device_id)
        finally:
            device.busy.release()

    def _restart(self, device: SimDevice) -> None:
        with device.busy:
            try:
                device.restart_after_crash(self.config.restart_delay_s)
                device.apply()
            except Exception:
                log.exception("%s: restart after a simulated crash failed", device.device_id)
