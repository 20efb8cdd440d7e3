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
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from agent.contract import (
    TOPIC_ROOT,
    Channel,
    EventMessage,
    HeartbeatTelemetry,
    MessageRejected,
    ReportedState,
    StatusMessage,
    decode_device_message,
)
from agent.mqtt import BrokerAddress, Inbound, MqttLink
from fleet import devices

__all__ = ["SUBSCRIPTIONS", "IngestMetrics", "IngestWorker"]

log = logging.getLogger(__name__)

SHARED_GROUP = "fleet"
SUBSCRIPTIONS = (
    f"{TOPIC_ROOT}/+/{Channel.STATUS.value}",
    f"{TOPIC_ROOT}/+/{Channel.REPORTED.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.TELEMETRY.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.EVENTS.value}",
    f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{Channel.DRIFT.value}",
)


@dataclass
class IngestMetrics:
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def accept(self, channel: str) -> None:
        with self._lock:
            self.accepted[channel] += 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "accepted": dict(self.accepted),
                "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()),
            }


class IngestWorker:
    def __init__(
        self,
        broker: BrokerAddress,
        engine: Engine,
        queue_max: int = 10_000,
        worker_id: str | None = None,
        session_expiry_s: int = 3600,
    ) -> None:
        """``worker_id`` must be stable across restarts of the same worker: the broker keeps
        its session (subscriptions, unacknowledged messages) for ``session_expiry_s``."""
        self.engine = engine
        self.metrics = IngestMetrics()
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
            message = self._queue.get()
            if message is None:
                return
            try:
                self._handle(message)
            except Exception:  # never let one message end the writer
                log.exception("unexpected failure on a message on %s", message.topic)
                self.metrics.reject("apply_error")
                message.ack()

    def _handle(self, message: Inbound) -> None:
        try:
            decoded = decode_device_message(message.topic, message.payload)
        except MessageRejected as exc:
            self.metrics.reject(exc.reason)
            log.warning("refused message on %s: %s", message.topic, exc)
            message.ack()
            return
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._apply(decoded, fresh=not message.retained)
                break
            except OperationalError as exc:  # database away: keep the message, retry
                log.warning("database unavailable (%s); retrying in %.1fs", exc.orig, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:  # a bug must not wedge the stream on one message
                log.exception("failed to apply a message on %s", message.topic)
                self.metrics.reject("apply_error")
                message.ack()
                return
        else:
            return  # stopping: leave it unacknowledged, the broker redelivers it
        self.metrics.accept(decoded.kind)
        message.ack()

    def _apply(self, message, fresh: bool) -> None:
        """``fresh``: not a retained copy, so it proves the device was just there."""
        with Session(self.engine) as session:
            if isinstance(message, StatusMessage):
                devices.apply_status(session, message, fresh)
            elif isinstance(message, ReportedState):
                devices.apply_reported(session, message, fresh)
            elif isinstance(message, HeartbeatTelemetry):
                devices.apply_heartbeat(session, message)
            elif isinstance(message, EventMessage):
                devices.apply_event(session, message)
            else:  # drift is stored by the feature that uses it
                devices.touch(session, message.device_id)
            session.commit()
