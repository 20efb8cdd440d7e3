"""Telemetry ingest: the fleet's MQTT consumer.

Why it looks like this:

* Messages are acknowledged to the broker (manual PUBACK) only after they are stored or
  refused, so a worker that dies mid-way gets them again; applying is idempotent
  (``fleet.devices``), so the redelivery is harmless.
* The paho network thread only enqueues; one writer thread does the database work, so a
  slow database never stalls keepalives (which would drop the connection).
* Bad input never stops the loop: every refusal is counted by reason and logged with it.
* ``status`` and ``reported`` are retained and low-volume: every worker subscribes to them
  directly, because MQTT v5 does not deliver retained messages to shared subscriptions and a
  restarted fleet must learn the current state. The high-volume streams (telemetry, events,
  drift) use ``$share/fleet/...`` so N workers split them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from agent.contract import (
    TOPIC_ROOT,
    Channel,
    DeviceMessageT,
    EventMessage,
    HeartbeatTelemetry,
    MessageRejected,
    ReportedState,
    StatusMessage,
    decode_device_message,
    utcnow,
)
from agent.mqtt import BrokerAddress, Inbound, MqttLink
from fleet import devices, telemetry

__all__ = ["SUBSCRIPTIONS", "IngestMetrics", "IngestWorker"]

log = logging.getLogger(__name__)

SHARED_GROUP = "fleet"
RATE_WINDOW_S = 10
SUBSCRIPTIONS = (
    f"{TOPIC_ROOT}/+/{Channel.STATUS.value}",
    f"{TOPIC_ROOT}/+/{Channel.REPORTED.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.TELEMETRY.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.EVENTS.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.DRIFT.value}",
)


@dataclass
class IngestMetrics:
    """Counters, ingest lag (store time minus the device's ``sent_at``; "last" is the
    largest of the last stored batch) and a 10-second rate of accepted messages, for
    ``GET /api/v1/metrics``.

    The rate is kept as one counter per whole second, pruned on every write: its memory is
    bounded by the window, not by the traffic, whether or not anyone reads the metrics."""

    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    heartbeats_stored: int = 0
    last_lag_s: float | None = None
    max_lag_s: float = 0.0
    _per_second: deque[list[int]] = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def accept(self, kind: str, lag_s: float | None = None, count: int = 1) -> None:
        second = int(time.monotonic())
        with self._lock:
            self.accepted[kind] += count
            if self._per_second and self._per_second[-1][0] == second:
                self._per_second[-1][1] += count
            else:
                self._per_second.append([second, count])
                self._prune(second)
            if lag_s is not None:
                self.last_lag_s = lag_s
                self.max_lag_s = max(self.max_lag_s, lag_s)

    def stored(self, rows: int) -> None:
        with self._lock:
            self.heartbeats_stored += rows

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def snapshot(self) -> dict:
        with self._lock:
            now = int(time.monotonic())
            self._prune(now)
            # The last RATE_WINDOW_S whole seconds; the current one is still filling up.
            recent = sum(count for second, count in self._per_second if second < now)
            return {
                "accepted": dict(self.accepted),
                "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()),
                "heartbeats_stored": self.heartbeats_stored,
                "messages_per_s": round(recent / RATE_WINDOW_S, 2),
                "lag_s_last": self.last_lag_s,
                "lag_s_max": self.max_lag_s,
            }

    def _prune(self, second: int) -> None:
        while self._per_second and second - self._per_second[0][0] > RATE_WINDOW_S:
            self._per_second.popleft()


class IngestWorker:
    def __init__(
        self,
        broker: BrokerAddress,
        engine: Engine,
        queue_max: int = 10_000,
        worker_id: str | None = None,
        session_expiry_s: int = 3600,
        batch_max: int = 500,
        batch_wait_s: float = 0.05,
    ) -> None:
        """``worker_id`` must be stable across restarts of the same worker: the broker keeps
        its session (subscriptions, unacknowledged messages) for ``session_expiry_s``."""
        self.engine = engine
        self.metrics = IngestMetrics()
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Inbound | None] = queue.Queue(maxsize=queue_max)
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._stopping = threading.Event()
        self.link = MqttLink(
            broker,
            client_id=f"edgefleet-fleet-{worker_id or uuid.uuid4().hex[:12]}",
            on_message=self._enqueue,
            on_connect=self._subscribe,
            manual_ack=True,
            # The broker never has more unacknowledged messages out to us than the queue
            # holds, so _enqueue never blocks paho's thread (and its keepalives).
            receive_maximum=min(queue_max, 65535),
            session_expiry_s=session_expiry_s if worker_id else None,
        )

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._writer.start()
        self.link.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store (and acknowledge) what is queued, then disconnect."""
        self._queue.put(None)
        self._writer.join(timeout)
        self._stopping.set()
        self.link.close()

    def wait_connected(self, timeout: float) -> bool:
        return self.link.wait_connected(timeout)

    def _subscribe(self) -> None:
        for name in SUBSCRIPTIONS:
            self.link.subscribe(name, qos=1)

    def _enqueue(self, message: Inbound) -> None:
        self._queue.put(message)

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._handle_batch(batch)
            except Exception:  # never let one batch end the writer
                log.exception("unexpected failure on a batch of %d messages", len(batch))
                for message in batch:
                    self.metrics.reject("apply_error")
                    message.ack()

    def _next_batch(self) -> list[Inbound] | None:
        """Block for one message, then take what else arrives within ``batch_wait_s``, up to
        ``batch_max``: size- or time-triggered batches. None once stop() was asked."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                message = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else (
                    self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if message is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(message)
        return batch

    def _handle_batch(self, batch: list[Inbound]) -> None:
        decoded: list[tuple[Inbound, DeviceMessageT]] = []
        for message in batch:
            try:
                decoded.append((message, decode_device_message(message.topic, message.payload)))
            except MessageRejected as exc:
                self.metrics.reject(exc.reason)
                log.warning("refused message on %s: %s", message.topic, exc)
                message.ack()
        if not decoded:
            return
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._store(decoded)
                break
            except OperationalError as exc:  # server away, deadlock, lock timeout: retry
                log.warning("batch not stored (%s); retrying in %.1fs", exc.orig, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        else:
            return  # stopping: leave it unacknowledged, the broker redelivers it
        now = utcnow()
        lag_s = max((now - item.sent_at).total_seconds() for _, item in decoded)
        for kind, count in Counter(item.kind for _, item in decoded).items():
            self.metrics.accept(kind, lag_s=lag_s, count=count)
        for message, _ in decoded:
            message.ack()

    def _store(self, decoded: list[tuple[Inbound, DeviceMessageT]]) -> None:
        """One transaction for the whole batch. Applying twice changes nothing, so a retry
        after a failed commit is safe."""
        beats = [m for _, m in decoded if isinstance(m, HeartbeatTelemetry)]
        events = [m for _, m in decoded if isinstance(m, EventMessage)]
        with Session(self.engine) as session:
            devices.lock_devices(session, {m.device_id for _, m in decoded})
            # Status, reported, events and drift edit device rows field by field (rare
            # messages); heartbeats, the bulk, update theirs in one statement.
            devices.load_devices(
                session, {m.device_id for _, m in decoded if not isinstance(m, HeartbeatTelemetry)}
            )
            for inbound, message in decoded:
                fresh = not inbound.retained
                if isinstance(message, StatusMessage):
                    devices.apply_status(session, message, fresh)
                elif isinstance(message, ReportedState):
                    devices.apply_reported(session, message, fresh)
            stored = telemetry.store_heartbeats(session, beats)
            devices.apply_heartbeats(session, beats)
            for event in events:
                devices.apply_event(session, event)
            for device_id in {m.device_id for _, m in decoded if m.kind == "drift"}:
                devices.touch(session, device_id)  # drift is stored by the drift feature
            session.commit()
        self.metrics.stored(stored)  # after the commit: a retried batch is counted once
