"""Benchmark: a fleet's steady heartbeat load (5,000 devices, one heartbeat each every 10 s)
into one, then two, ``edge-fleet serve`` ingest workers on PostgreSQL.

The acceptance line it answers: 5,000 simulated devices heartbeating every 10 s for two
minutes into two workers, ``ingest_lag_p99_s`` <= 5 s from the device's send to the row
being stored, with ``worker_cpu_per_1k_devices`` and ``pg_cpu_per_1k_devices``, and the same
figures for one worker.

Each phase (``--workers 1,2``: one worker, then two) has a fresh Mosquitto on a free port
(``fleet.local_broker.LocalBroker``: anonymous, ``max_queued_messages`` 1e6, so no QoS 1
message is silently dropped) and a fresh PostgreSQL database (dropped at the end, also on
failure), and real ``edge-fleet serve`` processes (``tests.fixtures.processes.start_fleet``)
in the shared-subscription set-up (``EDGEFLEET_INGEST_SHARED=true``), each with its own data
directory and worker id.

The devices: one MQTT connection each (MQTT v5, clean start, keepalive 15 s as the agent's
default), driven by ``--publishers`` processes (4), each running its share of paho clients
from one thread with a ``selectors`` loop (paho's ``socket()``, ``loop_read()``,
``loop_write()``, ``want_write()``, ``loop_misc()``), not a thread per client. They connect at
``--connect-rate`` (500/s in all) before anything is measured; then every device sends a
valid ``HeartbeatTelemetry`` (``agent.contract``; QoS 1 on
``edgefleet/v1/devices/<id>/telemetry``, ``sent_at`` the real send time, ``seq`` 1, 2, ...)
every ``--interval`` s (10) from a random phase, for ``--warmup`` s (10: device rows are
registered on first sight; not counted) and then the ``--duration`` s (120) measured.

Figures, per phase (``one_worker`` / ``two_workers`` in the JSON line):

* ``sent``, ``stored``, ``lost``, ``doubled``: every heartbeat of the phase (warm-up included)
  must be stored once: ``lost`` are sent (device, seq) pairs with no row, ``doubled`` rows
  beyond one per pair (0 by the table's unique constraint), ``unexpected`` rows never sent;
  ``redelivered``: heartbeats the workers took in more than once (their
  ``/api/v1/metrics``: accepted minus newly stored).
* ``ingest_lag_p50_s`` / ``_p99_s`` / ``_max_s``: over the heartbeats sent in the measured
  window, from the device's ``sent_at`` to its row being committed (visible to a reader).
  The row's ``received_at`` is *not* that: the worker sets it when it starts storing the
  batch (``fleet.telemetry.store_heartbeats``), after the batch wait and the device-row
  locks, before the COPY, the device updates and the commit. So a watcher polls the table
  every 0.1 s for new batches (one ``received_at`` each) and takes the first poll that sees
  a batch as its rows' commit time (an upper bound, at most 0.1 s late).
  ``received_lag_*`` is ``received_at`` minus ``sent_at`` (broker, worker queue, batching),
  ``commit_delay_p99_s`` the batches' ``received_at`` to visible.
* CPU during the measured window, from /proc (utime + stime): ``worker_cpu_cores`` (their
  sum; ``worker_cpu_cores_each``), ``pg_cpu_cores`` (the benchmark database's backends,
  the server's background processes and the postmaster, not the watcher's own backend nor
  other databases' backends; the watcher's is ``watcher_pg_cpu_cores``),
  ``broker_cpu_cores``, ``publishers_cpu_cores``, ``bench_cpu_cores`` (this process); each
  ``*_per_1k_devices`` is cores divided by devices / 1000. ``machine_busy_cores`` is the
  whole machine's (/proc/stat), ``other_cpu_cores`` what none of those used (other work).
* ``publisher_behind_p99_s``: how late the publishers sent against the schedule (if they
  fall behind, fewer heartbeats are sent, though each one's lag is still measured from its
  real send); ``puback_p99_s``: send to the broker's PUBACK.

``two_vs_one``: the two-worker figures over the one-worker ones.

Caveats: on a 2-core machine the publishers (Python, one connection per device), the broker,
PostgreSQL and the workers share the cores, so CPU figures are per process group but the
lag is that of a crowded machine; other work running at the same time shows in
``other_cpu_cores`` and ``load_avg``. PostgreSQL CPU is read from /proc, so only with the
server on this machine (else null). Devices send heartbeats only (no status, reported
state, events or drift).

    python bench/fleet_load.py                                  # 5000 devices, ~6 min
    python bench/fleet_load.py --devices 200 --duration 20      # quicker
    python bench/fleet_load.py --quick                          # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import CLOCK_TICKS, fresh_database, proc_stat  # noqa: E402

KEEPALIVE_S = 15  # edge-agent run's default
POLL_S = 0.1  # the watcher's period: the commit times' resolution
PROGRESS_S = 10.0


# --- the devices (publisher processes) ----------------------------------------------------


class _Device:
    __slots__ = ("alive", "born", "client", "id", "inflight", "seq", "sock", "topic",
                 "writing")

    def __init__(self, device_id: str, client: object, topic: str) -> None:
        self.id = device_id
        self.client = client
        self.topic = topic
        self.seq = 0
        self.born = time.time()
        self.inflight: dict[int, float] = {}
        self.sock: object = None
        self.writing = False
        self.alive = True


def publish(url: str, prefix: str, first: int, count: int, connect_rate: float,
            interval: float, seed: int) -> None:
    """Child process: ``count`` devices, one paho client (and connection) each, all driven
    from this thread by one selector. Talks to the benchmark through stdin / stdout: JSON
    progress lines out; ``start T0 TEND`` in (heartbeats from T0 to TEND); EOF: exit."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
    from agent.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)
    selector = selectors.DefaultSelector()
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    ack_s: list[float] = []
    behind_s: list[float] = []
    devices: list[_Device] = []
    stopping = [False]
    start: list[float] = []

    def say(**message: object) -> None:
        print(json.dumps(message), flush=True)

    def on_connect(client, device, flags, reason_code, properties) -> None:
        stats["refused" if reason_code.is_failure else "connected"] += 1

    def on_publish(client, device, mid, reason_code, properties) -> None:
        sent = device.inflight.pop(mid, None)
        stats["ack_refused" if reason_code.is_failure else "acked"] += 1
        if sent is not None:
            ack_s.append(time.time() - sent)

    def on_disconnect(client, device, flags, reason_code, properties) -> None:
        if device.alive and not stopping[0]:
            stats["disconnects"] += 1
        device.alive = False

    def on_socket_close(client, device, sock) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(sock)

    def want_write(device: _Device) -> None:
        """Ask the selector for writability only while paho has bytes it could not send."""
        wants = device.alive and device.client.want_write()
        if wants != device.writing and device.client.socket() is not None:
            device.writing = wants
            selector.modify(device.sock, selectors.EVENT_READ
                            | (selectors.EVENT_WRITE if wants else 0), device)

    def pump(timeout: float) -> None:
        for key, mask in selector.select(max(timeout, 0.0)):
            device = key.data
            if device is None:  # stdin
                line = sys.stdin.readline()
                if not line:  # the benchmark is gone
                    os._exit(1)
                word, *times = line.split()
                if word == "start":
                    start[:] = [float(t) for t in times]
                continue
            if mask & selectors.EVENT_READ:
                device.client.loop_read()
            if mask & selectors.EVENT_WRITE and device.alive:
                device.client.loop_write()
            if device.alive:
                want_write(device)

    last_misc = [time.time()]

    def misc() -> bool:
        """Keepalives (paho pings when due) once a second; True when it ran."""
        now = time.time()
        if now - last_misc[0] < 1.0:
            return False
        last_misc[0] = now
        for device in devices:
            if device.alive:
                device.client.loop_misc()
                want_write(device)
        return True

    selector.register(sys.stdin, selectors.EVENT_READ, None)

    # Connect, at a bounded rate.
    gap = 1.0 / connect_rate
    next_at = time.time()
    last_say = time.time()
    for index in range(first, first + count):
        while time.time() < next_at:
            pump(next_at - time.time())
        next_at += gap
        device_id = f"{prefix}{index:05d}"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=paho.MQTTv5)
        device = _Device(device_id, client, topic(device_id, "telemetry"))
        client.user_data_set(device)
        client.on_connect = on_connect
        client.on_publish = on_publish
        client.on_disconnect = on_disconnect
        client.on_socket_close = on_socket_close
        try:
            client.connect(address.host, address.port, keepalive=KEEPALIVE_S)
        except OSError as exc:
            stats["connect_errors"] += 1
            print(f"{device_id}: {exc}", file=sys.stderr)
            continue
        device.sock = client.socket()
        selector.register(device.sock, selectors.EVENT_READ, device)
        want_write(device)
        devices.append(device)
        misc()
        if time.time() - last_say >= 1.0:
            last_say = time.time()
            say(connected=stats["connected"])
    deadline = time.time() + 60
    while stats["connected"] + stats["refused"] < len(devices) and time.time() < deadline:
        pump(0.1)
        misc()
    say(connected=stats["connected"], ready=True, refused=stats["refused"],
        connect_errors=stats["connect_errors"])

    while not start:
        pump(0.2)
        misc()
    t0, t_end = start
    due = [(t0 + rng.uniform(0.0, interval), i) for i in range(len(devices))]
    heapq.heapify(due)
    last_say = time.time()
    while due:
        now = time.time()
        while due and due[0][0] <= now:
            scheduled, i = heapq.heappop(due)
            if scheduled + interval < t_end:
                heapq.heappush(due, (scheduled + interval, i))
            device = devices[i]
            if not device.alive:
                stats["skipped"] += 1
                continue
            device.seq += 1
            sent = time.time()
            beat = HeartbeatTelemetry(
                device_id=device.id, seq=device.seq, sent_at=utcnow(),
                uptime_s=round(sent - device.born, 3), cpu_percent=rng.uniform(2.0, 30.0),
                rss_mb=rng.uniform(35.0, 60.0), inference_count=device.seq * 10,
                error_count=0, latency_ms_p50=rng.uniform(1.0, 3.0),
                latency_ms_p95=rng.uniform(3.0, 9.0), outbox_depth=0,
            )
            info = device.client.publish(device.topic, encode(beat), qos=1)
            stats["published"] += 1
            if info.rc != paho.MQTT_ERR_SUCCESS:
                stats["publish_errors"] += 1
            device.inflight[info.mid] = sent
            behind_s.append(sent - scheduled)
            want_write(device)
            now = time.time()
        misc()
        if now - last_say >= 2.0:
            last_say = now
            say(published=stats["published"], acked=stats["acked"])
        pump(min(due[0][0] - time.time(), 0.5) if due else 0)
    deadline = time.time() + 60  # the last PUBACKs
    while stats["acked"] + stats["ack_refused"] < stats["published"] and time.time() < deadline:
        pump(0.1)
        misc()
    say(result={
        **stats,
        "sent_per_device": {d.id: d.seq for d in devices},
        "behind_p99_s": percentile(behind_s, 0.99),
        "behind_max_s": max(behind_s, default=None),
        "puback_p50_s": percentile(ack_s, 0.5),
        "puback_p99_s": percentile(ack_s, 0.99),
    })
    stopping[0] = True
    for device in devices:
        if device.alive:
            device.client.disconnect()


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(p * len(ordered)) - 1, 0)]


class Publisher:
    """One publisher process, its progress lines read by a thread."""

    def __init__(self, url: str, prefix: str, first: int, count: int, rate: float,
                 interval: float, seed: int, log: Path) -> None:
        self.count = count
        self.state: dict = {"connected": 0, "published": 0, "acked": 0}
        self.result: dict | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--publish", url, prefix, str(first), str(count),
             str(rate), str(interval), str(seed)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log.open("ab"), text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "result" in message:
                self.result = message["result"]
                self.done.set()
            else:
                self.state.update(message)
                if message.get("ready"):
                    self.ready.set()
        self.ready.set()
        self.done.set()

    def start(self, t0: float, t_end: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"start {t0} {t_end}\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the fleet side: commit times and CPU -------------------------------------------------


def _uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * CLOCK_TICKS


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class CpuWindow:
    """CPU seconds per group of processes over a window, processes that start or end in it
    included: each is sampled every second and keyed by (pid, start time); one born in the
    window counts from zero, one that ended counts up to its last sample."""

    def __init__(self) -> None:
        self.base: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.group: dict[tuple[int, int], str] = {}
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._start_ticks = 0.0
        self._machine: tuple[int, int] = (0, 0)
        self.machine_busy_s = 0.0

    def start(self, groups: dict[str, list[int]]) -> None:
        self.started_at = time.time()
        self._start_ticks = _uptime_ticks()
        self._machine = _machine_ticks()
        self.sample(groups)

    def sample(self, groups: dict[str, list[int]]) -> None:
        if self.started_at is None or self.ended_at is not None:
            return
        for name, pids in groups.items():
            for pid in pids:
                fields = proc_stat(pid)
                if fields is None:
                    continue
                key = (pid, int(fields[19]))
                # Workers with their children's time (none so far); not PostgreSQL's
                # postmaster, whose children are every database's backends.
                last = 15 if name.startswith("worker-") else 13
                cpu = sum(int(v) for v in fields[11:last]) / CLOCK_TICKS
                if key not in self.base:
                    self.base[key] = 0.0 if key[1] >= self._start_ticks else cpu
                self.last[key] = cpu
                self.group[key] = name

    def end(self, groups: dict[str, list[int]]) -> None:
        self.sample(groups)
        self.ended_at = time.time()
        busy, _ = _machine_ticks()
        self.machine_busy_s = (busy - self._machine[0]) / CLOCK_TICKS

    def seconds(self, name: str) -> float:
        return sum(self.last[k] - self.base[k] for k, g in self.group.items() if g == name)

    @property
    def wall_s(self) -> float:
        assert self.started_at is not None and self.ended_at is not None
        return self.ended_at - self.started_at


class Watcher(threading.Thread):
    """Polls the heartbeat table for new batches (a batch's rows share one ``received_at``)
    and keeps the time each was first seen: its rows' commit time, at most POLL_S late.
    Also samples the CPU of every process of the phase, once a second, over the measured
    window. Its own PostgreSQL backend is left out of PostgreSQL's CPU."""

    SLACK_S = 3.0  # a batch is looked for up to this long after a later one committed

    def __init__(self, db_url: str, groups: dict[str, list[int]],
                 window: tuple[float, float]) -> None:
        super().__init__(daemon=True)
        import psycopg

        self.db_url = db_url
        self.db = psycopg.connect(db_url, autocommit=True)
        self.db_name = db_url.rsplit("/", 1)[1]
        self.own_pid = self.db.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.fixed_groups = groups
        self.window = window
        self.cpu = CpuWindow()
        self.first_seen: dict = {}
        self.stored = 0  # rows in the batches seen so far
        self.pg_local: bool | None = None
        self._marks: deque[tuple[float, int]] = deque()
        self._max_id = 0
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the phase
            self.error = exc

    def _run(self) -> None:
        query = ("SELECT received_at, COUNT(*), MAX(id) FROM heartbeat WHERE id > %s "
                 "GROUP BY received_at")
        last_sample = 0.0
        while not self._stopping.is_set():
            now = time.time()  # the previous snapshot was taken before this
            while len(self._marks) > 1 and self._marks[1][0] <= now - self.SLACK_S:
                self._marks.popleft()
            floor = self._marks[0][1] if self._marks and self._marks[0][0] <= now - \
                self.SLACK_S else 0
            batches = self.db.execute(query, (floor,)).fetchall()
            seen = time.time()  # after this query's snapshot: each new batch committed before
            for received_at, rows, max_id in batches:
                if received_at not in self.first_seen:
                    self.first_seen[received_at] = seen
                    self.stored += rows
                self._max_id = max(self._max_id, max_id)
            self._marks.append((now, self._max_id))
            start, end = self.window
            if self.cpu.started_at is None and now >= start:
                self.cpu.start(self.groups())
                last_sample = now
            elif self.cpu.started_at is not None and self.cpu.ended_at is None:
                if now >= end:
                    self.cpu.end(self.groups())
                elif now - last_sample >= 1.0:
                    self.cpu.sample(self.groups())
                    last_sample = now
            self._stopping.wait(max(POLL_S - (time.time() - now), 0.0))

    def groups(self) -> dict[str, list[int]]:
        return {**self.fixed_groups, "postgres": self.postgres_pids(), "watcher": [self.own_pid]}

    def postgres_pids(self) -> list[int]:
        """The benchmark database's backends but this one, the server's background
        processes (autovacuum workers of other databases excepted) and the postmaster."""
        rows = self.db.execute(
            "SELECT pid, backend_type, datname FROM pg_stat_activity").fetchall()
        pids, background = [], []
        for pid, backend_type, datname in rows:
            if backend_type == "client backend":
                if datname == self.db_name and pid != self.own_pid:
                    pids.append(pid)
            elif datname in (None, self.db_name):
                background.append(pid)
        if self.pg_local is None:  # the server is on this machine: its processes are here
            self.pg_local = any(
                Path(f"/proc/{pid}/comm").exists()
                and Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
                for pid in background)
        if not self.pg_local:
            return []
        parents = {int(f[1]) for pid in background if (f := proc_stat(pid)) is not None}
        return pids + background + sorted(parents)

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)
        with contextlib.suppress(Exception):
            self.db.close()


# --- one phase: N workers -----------------------------------------------------------------


def _label(workers: int) -> str:
    return f"{workers} worker{'s' if workers > 1 else ''}"


def run_phase(workers: int, args: argparse.Namespace, work: Path) -> dict:
    """A fresh broker and database, ``workers`` fleet processes, the devices: the figures."""
    from fleet.local_broker import LocalBroker
    from tests.fixtures.processes import start_fleet

    label = _label(workers)
    print(f"== {label}: {args.devices} devices, a heartbeat each every {args.interval:g} s, "
          f"{args.warmup:g} s warm-up + {args.duration:g} s measured", flush=True)
    work.mkdir(parents=True)
    prefix = f"w{workers}d"
    fleets: list = []
    publishers: list[Publisher] = []
    watcher: Watcher | None = None
    with LocalBroker(work / "broker") as broker, fresh_database() as db_url:
        try:
            started = time.time()

            def start_worker(index: int):
                return start_fleet(work, broker.url, db_url, name=f"worker-{index}", extra_env={
                    "EDGEFLEET_INGEST_SHARED": "true",
                    "EDGEFLEET_WORKER_ID": f"bench-{workers}w-{index}",
                    "EDGEFLEET_LOG_LEVEL": "WARNING"})

            # All at once (the fleet migrates a new database once, under a lock); every one
            # that started is kept, to be stopped below, whatever happened to the others.
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(start_worker, index) for index in range(workers)]
            failures = [f.exception() for f in futures if f.exception() is not None]
            fleets.extend(f.result() for f in futures if f.exception() is None)
            if failures:
                raise failures[0]
            print(f"  {label} serving after {time.time() - started:.1f} s", flush=True)

            shares = [args.devices // args.publishers + (i < args.devices % args.publishers)
                      for i in range(args.publishers)]
            first = 0
            for i, share in enumerate(shares):
                if share:
                    publishers.append(Publisher(
                        broker.url, prefix, first, share, args.connect_rate / args.publishers,
                        args.interval, args.seed + i, work / f"publisher-{i}.log"))
                first += share
            started = time.time()
            last = 0.0
            while not all(p.ready.is_set() for p in publishers):
                if time.time() - last >= 2.0:
                    last = time.time()
                    connected = sum(p.state["connected"] for p in publishers)
                    print(f"  connecting: {connected}/{args.devices} devices", flush=True)
                time.sleep(0.1)
            connect_s = time.time() - started
            connected = sum(p.state["connected"] for p in publishers)
            print(f"  connected {connected}/{args.devices} devices in {connect_s:.1f} s "
                  f"(one MQTT connection each)", flush=True)
            if any(p.process.poll() is not None for p in publishers):
                raise RuntimeError(f"a publisher exited early; see {work}/publisher-*.log")

            t0 = time.time() + 1.0
            window = (t0 + args.warmup, t0 + args.warmup + args.duration)
            groups = {f"worker-{i}": [f.process.pid] for i, f in enumerate(fleets)}
            groups["broker"] = [broker.pid or 0]
            groups["publishers"] = [p.process.pid for p in publishers]
            groups["bench"] = [os.getpid()]
            watcher = Watcher(db_url, groups, window)
            watcher.start()
            load_start = os.getloadavg()
            for publisher in publishers:
                publisher.start(t0, window[1])
            while time.time() < window[1] + 1.0 and watcher.cpu.ended_at is None:
                time.sleep(min(PROGRESS_S, max(window[1] - time.time(), 0.0) + 0.3))
                now = time.time()
                stage = ("warm-up" if now < window[0] else "measured"
                         if now < window[1] else "window over")
                if watcher.error is not None:
                    raise watcher.error
                print(f"  t+{now - t0:5.0f} s ({stage}): "
                      f"sent {sum(p.state['published'] for p in publishers)}, "
                      f"acked {sum(p.state['acked'] for p in publishers)}, "
                      f"stored {watcher.stored}", flush=True)
            load_end = os.getloadavg()

            for publisher in publishers:
                if not publisher.done.wait(90):
                    raise RuntimeError("a publisher did not report its result")
            results = [p.result for p in publishers]
            if any(r is None for r in results):
                raise RuntimeError(f"a publisher failed; see {work}/publisher-*.log")
            sent = sum(r.get("published", 0) for r in results)
            deadline = time.time() + max(60.0, 3 * args.interval)
            while watcher.stored < sent and time.time() < deadline:
                time.sleep(0.5)
            time.sleep(2 * POLL_S)
            watcher.stop()
            if watcher.error is not None:
                raise watcher.error
            # One database, one admin token: that of the worker that initialised it.
            token = next(fleet.token for fleet in fleets if fleet.token)
            metrics = []
            for fleet in fleets:
                with fleet.client(token=token) as client:
                    metrics.append(client.get("/api/v1/metrics").json()["ingest"])
            figures = _figures(args, watcher, results, metrics, window, connect_s)
            figures["load_avg"] = [round(v, 2) for v in (*load_start, *load_end)]
            _print_phase(figures)
            return figures
        finally:
            if watcher is not None:
                watcher.stop()
            for publisher in publishers:
                publisher.stop()
            for fleet in fleets:
                fleet.terminate()


def _figures(args: argparse.Namespace, watcher: Watcher, results: list[dict],
             metrics: list[dict], window: tuple[float, float], connect_s: float) -> dict:
    import psycopg

    with psycopg.connect(watcher.db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT device_id, seq, sent_at, received_at FROM heartbeat").fetchall()
    expected = {(device, seq) for r in results for device, last in r["sent_per_device"].items()
                for seq in range(1, last + 1)}
    stored_pairs = {(device, seq) for device, seq, _, _ in rows}
    commit_delays = [seen - received.timestamp() for received, seen in watcher.first_seen.items()
                     if window[0] <= received.timestamp() < window[1] + 5]
    worst_commit = max(commit_delays, default=0.0)
    lags, received_lags, unobserved = [], [], 0
    for _, _, sent_at, received_at in rows:
        sent = sent_at.timestamp()
        if not window[0] <= sent < window[1]:
            continue
        received_lags.append(received_at.timestamp() - sent)
        seen = watcher.first_seen.get(received_at)
        if seen is None:
            unobserved += 1
            seen = received_at.timestamp() + worst_commit
        lags.append(seen - sent)

    cpu = watcher.cpu
    wall = cpu.wall_s
    per_k = args.devices / 1000

    def cores(name: str) -> float:
        return cpu.seconds(name) / wall

    workers_each = [cores(g) for g in sorted(watcher.fixed_groups) if g.startswith("worker-")]
    worker = sum(workers_each)
    pg = cores("postgres") if watcher.pg_local else None
    measured = (worker + (pg or 0) + cores("broker") + cores("publishers") + cores("bench")
                + cores("watcher"))
    machine = cpu.machine_busy_s / wall

    def r(value: float | None, digits: int = 3) -> float | None:
        return None if value is None else round(value, digits)

    sent = sum(x.get("published", 0) for x in results)
    return {
        "sent": sent,
        "acked": sum(x.get("acked", 0) for x in results),
        "stored": len(stored_pairs & expected),
        "lost": len(expected - stored_pairs),
        "doubled": len(rows) - len(stored_pairs),
        "unexpected": len(stored_pairs - expected),
        "redelivered": sum(m["accepted"].get("heartbeat", 0) - m["heartbeats_stored"]
                           for m in metrics),
        "rejected": sum(m["rejected_total"] for m in metrics),
        "disconnects": sum(x.get("disconnects", 0) for x in results),
        "connected": sum(x.get("connected", 0) for x in results),
        "connect_s": r(connect_s, 1),
        "window_s": r(wall, 1),
        "heartbeats_in_window": len(lags),
        "msgs_per_s": r(len(lags) / args.duration, 1),
        "ingest_lag_p50_s": r(percentile(lags, 0.5)),
        "ingest_lag_p99_s": r(percentile(lags, 0.99)),
        "ingest_lag_max_s": r(max(lags, default=None)),
        "received_lag_p50_s": r(percentile(received_lags, 0.5)),
        "received_lag_p99_s": r(percentile(received_lags, 0.99)),
        "received_lag_max_s": r(max(received_lags, default=None)),
        "commit_delay_p99_s": r(percentile(commit_delays, 0.99)),
        "lag_unobserved_rows": unobserved,
        "worker_cpu_cores": r(worker),
        "worker_cpu_cores_each": [r(c) for c in workers_each],
        "worker_cpu_per_1k_devices": r(worker / per_k, 4),
        "pg_cpu_cores": r(pg),
        "pg_cpu_per_1k_devices": r(None if pg is None else pg / per_k, 4),
        "broker_cpu_cores": r(cores("broker")),
        "broker_cpu_per_1k_devices": r(cores("broker") / per_k, 4),
        "publishers_cpu_cores": r(cores("publishers")),
        "bench_cpu_cores": r(cores("bench")),
        "watcher_pg_cpu_cores": r(cores("watcher")),
        "machine_busy_cores": r(machine),
        "other_cpu_cores": r(max(machine - measured, 0.0)),
        "publisher_behind_p99_s": r(max((x["behind_p99_s"] or 0) for x in results)),
        "puback_p99_s": r(max((x["puback_p99_s"] or 0) for x in results)),
    }


def _print_phase(f: dict) -> None:
    print(f"  sent {f['sent']}, stored {f['stored']}, lost {f['lost']}, doubled {f['doubled']}"
          f" (redelivered {f['redelivered']}, rejected {f['rejected']}, "
          f"disconnects {f['disconnects']})")
    print(f"  ingest lag, send -> row committed: p50 {f['ingest_lag_p50_s']} s, "
          f"p99 {f['ingest_lag_p99_s']} s, max {f['ingest_lag_max_s']} s (goal p99 <= 5 s; "
          f"{f['heartbeats_in_window']} heartbeats in the window)")
    print(f"  send -> received_at (store started): p50 {f['received_lag_p50_s']} s, "
          f"p99 {f['received_lag_p99_s']} s; commit delay p99 {f['commit_delay_p99_s']} s")
    print(f"  CPU, cores: workers {f['worker_cpu_cores']} {f['worker_cpu_cores_each']} "
          f"= {f['worker_cpu_per_1k_devices']} per 1k devices; PostgreSQL "
          f"{f['pg_cpu_cores']} = {f['pg_cpu_per_1k_devices']} per 1k; broker "
          f"{f['broker_cpu_cores']}; publishers {f['publishers_cpu_cores']}; machine busy "
          f"{f['machine_busy_cores']} of {os.cpu_count()} (other work {f['other_cpu_cores']}); "
          f"load avg {f['load_avg']}", flush=True)


def _ratio(two: float | None, one: float | None) -> float | None:
    return None if not one or two is None else round(two / one, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, help="simulated devices (5000; quick: 50)")
    parser.add_argument("--interval", type=float, help="seconds between heartbeats (10; quick: 2)")
    parser.add_argument("--duration", type=float, help="measured seconds (120; quick: 10)")
    parser.add_argument("--warmup", type=float,
                        help="seconds sent before the window (10; quick: 2)")
    parser.add_argument("--publishers", type=int, help="publisher processes (4; quick: 2)")
    parser.add_argument("--connect-rate", type=float, default=500.0,
                        help="device connections per second, in all")
    parser.add_argument("--workers", default="1,2", help="the phases: worker counts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 50 devices, 2 s interval, 10 s measured")
    parser.add_argument("--publish", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        url, prefix, first, count, rate, interval, seed = args.publish
        publish(url, prefix, int(first), int(count), float(rate), float(interval), int(seed))
        return
    defaults = ({"devices": 50, "interval": 2.0, "duration": 10.0, "warmup": 2.0, "publishers": 2}
                if args.quick else
                {"devices": 5000, "interval": 10.0, "duration": 120.0, "warmup": 10.0,
                 "publishers": 4})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    phases = [int(n) for n in args.workers.split(",")]
    # A SIGTERM ends the run through the finally clauses (database dropped, processes ended).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.time()
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    figures: dict = {
        "devices": args.devices, "interval_s": args.interval, "duration_s": args.duration,
        "warmup_s": args.warmup, "publishers": args.publishers, "connections": "one per device",
        "cores": os.cpu_count() or 0,
    }
    keys = {1: "one_worker", 2: "two_workers"}
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-load-") as tmp:
        for workers in phases:
            key = keys.get(workers, f"workers_{workers}")
            figures[key] = run_phase(workers, args, Path(tmp) / key)
    if "one_worker" in figures and "two_workers" in figures:
        one, two = figures["one_worker"], figures["two_workers"]
        figures["two_vs_one"] = {
            name: _ratio(two[name], one[name])
            for name in ("worker_cpu_cores", "pg_cpu_cores", "ingest_lag_p99_s",
                         "received_lag_p99_s")
        }
    figures["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
