"""Benchmark: fleet ingest throughput against a bare MQTT subscriber, 1 vs 2 workers, RSS.

Simulated devices publish heartbeats (QoS 1) as fast as they can into a real mosquitto.
1000 devices by default, so that a batch of 500 messages holds 500 different devices, as
it would in a fleet (each device updates its own row), and splitting the stream between
two workers does not make their batches cheaper than one worker's.
In the same run, on the same stream:

* a bare paho subscriber (shared subscription, counting only) gives the receive rate;
* one ``edge-fleet serve`` worker with PostgreSQL stores the stream: ``ingest_vs_bare`` is
  its stored rate over the bare receive rate (goal >= 0.8);
* ``worker_rss_mb`` / ``worker_rss_mb_long``: the worker's peak RSS after a stream and a
  backlog, then after a further stream 10x longer (goal: flat);
* capacity, 1 vs 2 workers: a live stream from one Python publisher is capped by that
  publisher (both 1 and 2 workers keep up with it, so their ratio says nothing), so the
  workers are also measured draining a backlog the broker held for them while they were
  frozen: ``drain_msgs_per_s`` (1 worker), ``drain_msgs_per_s_two`` and
  ``two_workers_vs_one`` (goal >= 1.6 where the cores allow; on 2 cores the broker,
  PostgreSQL and the workers share them). ``two_workers_vs_one_live`` is the live ratio.
  What the cores allow is printed beside it: the CPU time per message of the worker,
  PostgreSQL and the broker during the one-worker drain (``*_cpu_us_per_msg``), and the
  ratio those costs cap two workers at on this machine (``two_workers_vs_one_cpu_bound``).

Live rates run from the first publish to the last message received or stored; drain rates
from the first stored batch to the last. Each rate is the median of ``--repeat`` runs (3).
Last line: one JSON object.

    python bench/ingest.py                          # 1000 devices, 20 000 messages
    python bench/ingest.py --messages 2000 --no-long  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import PG_ADMIN, cpu_seconds, postgres_pids  # noqa: E402

# seq bases, one range per run, so no run's rows count for another's.
SEQ_STEP = 10**8
DRAIN = 2 * 10**9
LONG = 3 * 10**9


def publish(url: str, devices: int, messages: int, first_seq: int) -> None:
    """Child process: publish ``messages`` heartbeats round-robin over ``devices`` ids."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.contract import HeartbeatTelemetry, encode, topic, utcnow
    from agent.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)  # unbounded: this process is the load generator
    client.connect(address.host, address.port)
    client.loop_start()
    infos = []
    for index in range(messages):
        if len(infos) >= 5000:  # keep the client's queue (and our memory) bounded
            infos.pop(0).wait_for_publish(timeout=120)
        device = f"sim-{index % devices:05d}"
        beat = HeartbeatTelemetry(
            device_id=device, seq=first_seq + index // devices, sent_at=utcnow(), uptime_s=1.0,
            cpu_percent=5.0, rss_mb=40.0, inference_count=index, error_count=0,
            latency_ms_p50=1.0, latency_ms_p95=2.0,
        )
        infos.append(client.publish(topic(device, "telemetry"), encode(beat), qos=1))
    for info in infos:
        info.wait_for_publish(timeout=120)
    client.disconnect()
    client.loop_stop()


def subscribe(url: str, messages: int, ready_file: str) -> None:
    """Child process: the bare subscriber. Prints the time of the last message."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.mqtt import BrokerAddress

    address = BrokerAddress.parse(url)
    done = threading.Event()
    count = [0]

    def on_message(client, userdata, message):
        count[0] += 1
        if count[0] >= messages:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare", protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: (
        c.subscribe("$share/bare/edgefleet/v1/devices/+/telemetry", qos=1),
        Path(ready_file).touch(),
    )
    client.connect(address.host, address.port)
    client.loop_start()
    done.wait(600)
    print(json.dumps({"last": time.time(), "count": count[0]}))
    client.disconnect()
    client.loop_stop()


def _python(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, **kwargs)


def run_bare(url: str, devices: int, messages: int, work: Path) -> float:
    ready = work / "bare.ready"
    subscriber = _python("--subscribe", url, str(messages), str(ready),
                         stdout=subprocess.PIPE, text=True)
    while not ready.exists():
        time.sleep(0.05)
    started = time.time()
    _python("--publish", url, str(devices), str(messages), "1").wait()
    out, _ = subscriber.communicate(timeout=600)
    result = json.loads(out.strip().splitlines()[-1])
    return result["count"] / (result["last"] - started)


class Workers:
    """``count`` edge-fleet serve processes on one fresh PostgreSQL database. Each has a
    stable worker id, so its broker session (and its share of a backlog) survives a stop."""

    def __init__(self, url: str, count: int, work: Path, broker_pid: int | None) -> None:
        import psycopg

        self.url = url
        self.broker_pid = broker_pid
        self.drain_cpu_us_per_msg: dict[str, float] = {}
        self.count = count
        self.work = work
        self.admin = psycopg.connect(PG_ADMIN, autocommit=True)
        self.db_name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        self.admin.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.db_name
        self.processes: list[subprocess.Popen] = []
        work.mkdir(parents=True, exist_ok=True)
        self.start()
        self.db = psycopg.connect(self.db_url, autocommit=True)

    def start(self) -> None:
        """All workers at once, so none drains a backlog alone while another starts."""
        import httpx

        from fleet.local_broker import free_port

        ports = []
        for index in range(self.count):
            ports.append(free_port())
            env = {**os.environ, "EDGEFLEET_DATABASE_URL": self.db_url,
                   "EDGEFLEET_DATA_DIR": str(self.work / f"fleet-{index}"),
                   "EDGEFLEET_WORKER_ID": f"bench-{index}", "EDGEFLEET_LOG_LEVEL": "WARNING",
                   "EDGEFLEET_INGEST_SHARED": "true"}
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "fleet.cli", "serve", "--port", str(ports[-1]),
                 "--broker", self.url], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                stderr=(self.work / f"fleet-{index}.log").open("ab")))
        deadline = time.monotonic() + 60
        for port in ports:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()[
                            "ingest_connected"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log = (self.work / f"fleet-{ports.index(port)}.log").read_text()
                    raise RuntimeError(f"edge-fleet serve did not start:\n{log[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(30)
        self.processes = []

    def rates(self, devices: int, messages: int, repeat: int) -> tuple[float, float]:
        """Median live rate and median drain rate over ``repeat`` runs each, printed."""
        label = f"{self.count} worker{'s' if self.count > 1 else ''}"
        live = median(self.run(devices, messages, 1 + i * SEQ_STEP) for i in range(repeat))
        print(f"{label} stored:  {live:9.0f} msgs/s (live)")
        drain = median(self.drain(devices, messages, DRAIN + i * SEQ_STEP)
                       for i in range(repeat))
        print(f"{label} drained: {drain:9.0f} msgs/s (backlog)")
        print("  CPU per message: "
              + ", ".join(f"{k} {v} us" for k, v in self.drain_cpu_us_per_msg.items()))
        return live, drain

    def run(self, devices: int, messages: int, first_seq: int) -> float:
        """Live: the rate from the first publish to the last row stored."""
        started = time.time()
        publisher = _python("--publish", self.url, str(devices), str(messages), str(first_seq))
        _, last = self._wait_for(messages, first_seq)
        publisher.wait()
        return messages / max(last.timestamp() - started, 1e-3)

    def drain(self, devices: int, messages: int, first_seq: int) -> float:
        """Capacity: the workers are frozen (SIGSTOP) while the stream is published, so the
        broker holds it for them; then all are resumed at once (SIGCONT) and store it as fast
        as they can. The rate runs from the first stored batch to the last (the rows'
        ``received_at``), without the last batch's rows. Freezing rather than restarting
        keeps process start-up, and one worker starting before the other, out of the
        figure."""
        for process in self.processes:
            process.send_signal(signal.SIGSTOP)
        try:
            _python("--publish", self.url, str(devices), str(messages), str(first_seq)).wait()
        finally:
            groups = {"worker": [p.pid for p in self.processes], "postgres": postgres_pids(),
                      "broker": [self.broker_pid]}
            before = {name: cpu_seconds(pids) for name, pids in groups.items()}
            for process in self.processes:
                process.send_signal(signal.SIGCONT)
            resumed = time.time()
        first, last = self._wait_for(messages, first_seq)
        done = time.time()
        # ``received_at`` is when a batch started to be stored: the span from the first
        # batch's start to the last one's covers every batch but the last, so its rows are
        # left out of the count too (otherwise the rate would be overstated by one batch).
        in_last_batch = self.db.execute(
            "SELECT COUNT(*) FROM heartbeat WHERE received_at = %s AND seq >= %s AND seq < %s",
            (last, first_seq, first_seq + messages)).fetchone()[0]
        self.drain_cpu_us_per_msg = {
            name: round((cpu_seconds(pids) - before[name]) / messages * 1e6, 1)
            for name, pids in groups.items()
        }
        if in_last_batch >= messages:  # all in one batch (a tiny run): only the poll's time
            return messages / (done - resumed)
        return (messages - in_last_batch) / (last - first).total_seconds()

    def _wait_for(self, messages: int, first_seq: int) -> tuple:
        """Until the run's rows are all stored; their first and last ``received_at``. The
        poll is slow on purpose: counting a large table takes PostgreSQL's CPU from the
        workers being measured, and the times come from the rows, not from the poll."""
        query = ("SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM heartbeat "
                 "WHERE seq >= %s AND seq < %s")
        span = (first_seq, first_seq + messages)
        deadline = time.monotonic() + 600
        while True:
            count, first, last = self.db.execute(query, span).fetchone()
            if count >= messages:
                return first, last
            if time.monotonic() > deadline:
                raise RuntimeError(f"stored {count} of {messages} rows in 600 s")
            time.sleep(0.5)

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.processes[0].pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def close(self) -> None:
        self.stop()
        self.db.close()
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        self.admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--no-long", action="store_true", help="skip the 10x longer run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per rate; the median is reported (the VM is noisy)")
    parser.add_argument("--publish", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--subscribe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        publish(args.publish[0], int(args.publish[1]), int(args.publish[2]),
                int(args.publish[3]))
        return
    if args.subscribe:
        subscribe(args.subscribe[0], int(args.subscribe[1]), args.subscribe[2])
        return

    from fleet.local_broker import LocalBroker

    figures: dict[str, float] = {}
    repeat = args.repeat
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        with LocalBroker(work / "broker") as broker:
            bare = median(run_bare(broker.url, args.devices, args.messages, work)
                          for _ in range(repeat))
            print(f"bare subscriber:  {bare:9.0f} msgs/s")

            one = Workers(broker.url, 1, work / "one", broker.pid)
            try:
                rate_one, drain_one = one.rates(args.devices, args.messages, repeat)
                cpu = one.drain_cpu_us_per_msg  # of the last drain
                figures.update({f"{name}_cpu_us_per_msg": value for name, value in cpu.items()})
                # What the cores allow: every message costs the worker's, PostgreSQL's and the
                # broker's CPU; with all cores busy that caps the rate, whatever the workers.
                ceiling = (os.cpu_count() or 1) * 1e6 / sum(cpu.values())
                figures["two_workers_vs_one_cpu_bound"] = round(
                    min(ceiling, 2 * drain_one) / drain_one, 3)
                figures["worker_rss_mb"] = round(one.peak_rss_mb(), 1)
                if not args.no_long:
                    one.run(args.devices, args.messages * 10, LONG)
                    figures["worker_rss_mb_long"] = round(one.peak_rss_mb(), 1)
            finally:
                one.close()

            two = Workers(broker.url, 2, work / "two", broker.pid)
            try:
                rate_two, drain_two = two.rates(args.devices, args.messages, repeat)
                figures["two_workers_cpu_us_per_msg"] = round(
                    sum(two.drain_cpu_us_per_msg.values()), 1)
            finally:
                two.close()
    figures.update({
        "ingest_vs_bare": round(rate_one / bare, 3),
        "two_workers_vs_one": round(drain_two / drain_one, 3),
        "two_workers_vs_one_live": round(rate_two / rate_one, 3),
        "drain_msgs_per_s": round(drain_one),
        "drain_msgs_per_s_two": round(drain_two),
        "msgs_per_s": round(rate_one),
        "bare_msgs_per_s": round(bare),
        "cores": os.cpu_count() or 0,
    })
    print(f"worker peak RSS: {figures['worker_rss_mb']} MB"
          + (f", after 10x longer: {figures['worker_rss_mb_long']} MB"
             if "worker_rss_mb_long" in figures else ""))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
