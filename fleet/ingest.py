"""Telemetry ingest: the fleet's MQTT consumer.

Why it looks like this:

* Messages are acknowledged to the broker (manual PUBACK) only after they are stored or
  refused, so a worker that dies mid-way gets them again; applying is idempotent
  (``fleet.devices``), so the redelivery is harmless.
* The paho network thread only enqueues; one writer thread does the database work, so a
  slow database never stalls keepalives (which would drop the connection).
* Bad input never stops the loop: every refusal is counted by reason and logged with it
  (at most :data:`REFUSAL_LOG_BURST` lines per reason a minute: a flood of bad messages must
  not become a flood of log lines).
* One bad message costs only itself. Any exception while decoding one message refuses that
  message; a batch whose transaction fails for any reason but the database being away is
  split in halves and each half is stored again, down to the single message that cannot be
  stored, which is refused as ``unstorable``. So a message that passes the contract but
  trips the database (or a bug) never takes its batch-mates, other devices' messages
  included, down with it.
* A refused message on a retained channel (``status``, ``reported``) would come back from
  the broker after every restart of every worker: the fleet clears it (an empty retained
  publish).
  Devices republish both on every connection, so nothing is lost that a device still means.
* ``status`` and ``reported`` are retained and low-volume: every worker subscribes to them
  directly, because MQTT v5 does not deliver retained messages to shared subscriptions and a
  restarted fleet must learn the current state. The high-volume streams (telemetry, events,
  drift) use ``$share/fleet/...`` when several workers split them (``shared=True``); a lone
  worker subscribes to them directly, because Mosquitto 2.0 does not restore a persistent
  session's *shared* subscriptions after the broker restarts: until the worker reconnects
  and subscribes again, what devices send to the empty group is dropped, while a direct
  subscription is restored and its messages queued (``tests/e2e/test_outage.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from agent.contract import (
    TOPIC_ROOT,
    Channel,
    DeviceMessageT,
    DriftMessage,
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
from fleet.drift import store as drift_store
from fleet.rollouts import store as rollout_store

__all__ = ["DIRECT_SUBSCRIPTIONS", "SUBSCRIPTIONS", "IngestMetrics", "IngestWorker"]

log = logging.getLogger(__name__)

SHARED_GROUP = "fleet"
FLEET_ACCOUNT_PREFIX = "edgefleet-fleet-"
RATE_WINDOW_S = 10
REFUSAL_LOG_BURST = 10
RETAINED_CHANNELS = frozenset({Channel.STATUS.value, Channel.REPORTED.value})
_RETAINED = (Channel.STATUS, Channel.REPORTED)
_STREAMS = (Channel.TELEMETRY, Channel.EVENTS, Channel.DRIFT)
# Several workers: the streams split between them through the shared group.
SUBSCRIPTIONS = (
    *(f"{TOPIC_ROOT}/+/{channel.value}" for channel in _RETAINED),
    *(f"$share/{SHARED_GROUP}/{TOPIC_ROOT}/+/{channel.value}" for channel in _STREAMS),
)
# A lone worker: every channel directly (restored by the broker after its restart).
DIRECT_SUBSCRIPTIONS = tuple(f"{TOPIC_ROOT}/+/{c.value}" for c in (*_RETAINED, *_STREAMS))


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
    retained_cleared: int = 0
    drift_alerts: Counter[str] = field(default_factory=Counter)  # raised / cleared
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

    def drift_alert(self, change: str) -> None:
        with self._lock:
            self.drift_alerts[change] += 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def cleared(self) -> None:
        with self._lock:
            self.retained_cleared += 1

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
                "retained_cleared": self.retained_cleared,
                "drift_alerts": dict(self.drift_alerts),
                "messages_per_s": round(recent / RATE_WINDOW_S, 2),
                "lag_s_last": self.last_lag_s,
                "lag_s_max": self.max_lag_s,
            }

    def _prune(self, second: int) -> None:
        while self._per_second and second - self._per_second[0][0] > RATE_WINDOW_S:
            self._per_second.popleft()


class _RefusalLog:
    """Logs refusals, at most ``burst`` lines per reason per minute; the rest are counted
    and summed up in the next line that is logged for that reason."""

    def __init__(self, burst: int = REFUSAL_LOG_BURST, period_s: float = 60.0) -> None:
        self.burst = burst
        self.period_s = period_s
        self._windows: dict[str, list[float | int]] = {}  # reason -> [start, logged, quiet]

    def __call__(self, reason: str, text: str, *args: object) -> None:
        now = time.monotonic()
        window = self._windows.setdefault(reason, [now, 0, 0])
        if now - window[0] >= self.period_s:
            if window[2]:
                log.warning("%d more messages refused as %s in the last minute", window[2], reason)
            window[:] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            log.warning(text, *args)
        else:
            window[2] += 1


class _Stopping(Exception):
    """The worker is stopping while the database is away: leave the batch unacknowledged."""


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
        shared: bool = False,
        notify_drift: bool = False,
        on_drift_alert: Callable[[], None] | None = None,
    ) -> None:
        """``notify_drift``: a drift webhook is configured (changed alerts wait for it);
        ``on_drift_alert`` is called after a batch that raised or cleared one committed.

        ``worker_id`` must be stable across restarts of the same worker: the broker keeps
        its session (subscriptions, unacknowledged messages) for ``session_expiry_s``.
        ``shared``: one of several workers splitting the streams (see the module notes)."""
        self.engine = engine
        self.notify_drift = notify_drift
        self.on_drift_alert = on_drift_alert
        self.subscriptions = SUBSCRIPTIONS if shared else DIRECT_SUBSCRIPTIONS
        self.metrics = IngestMetrics()
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Inbound | None] = queue.Queue(maxsize=queue_max)
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._stopping = threading.Event()
        self._log_refusal = _RefusalLog()
        self.link = MqttLink(
            broker,
            # A production broker binds each fleet account to its own client id: a worker
            # account's user name is that id (deploy/mosquitto/add-account.sh).
            client_id=(broker.username if broker.username
                       and broker.username.startswith(FLEET_ACCOUNT_PREFIX)
                       else f"{FLEET_ACCOUNT_PREFIX}{worker_id or uuid.uuid4().hex[:12]}"),
            on_message=self._enqueue,
            on_connect=self._subscribe,
            manual_ack=True,
            # The broker never has more unacknowledged messages out to us than the queue
            # holds, so _enqueue never blocks paho's thread (and its keepalives).
            receive_maximum=min(queue_max, 65535),
            session_expiry_s=session_expiry_s if worker_id else None,
            # The broker is the fleet's own: come back quickly after it restarts.
            max_backoff=5,
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
        for name in self.subscriptions:
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
            except Exception:  # a defect outside any one message: never end the writer
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
        decoded = [(message, item) for message in batch if (item := self._decode(message))]
        pending = [decoded] if decoded else []
        while pending:  # halves of a failed batch, the earlier half first
            part = pending.pop()
            try:
                stale = self._store_retrying(part)
            except _Stopping:
                return  # left unacknowledged: the broker redelivers it
            except Exception as exc:
                if len(part) == 1:
                    inbound, message = part[0]
                    log.error("cannot store the message on %s (seq %d)", inbound.topic,
                              message.seq, exc_info=exc)
                    self._refuse(inbound, "unstorable", f"{type(exc).__name__}: {exc}")
                else:
                    log.debug("a batch of %d failed (%s); storing its halves", len(part), exc)
                    middle = len(part) // 2
                    pending += [part[middle:], part[:middle]]
                continue
            for inbound, message in stale:
                self._refuse(inbound, "stale_incarnation",
                             f"incarnation {message.incarnation} of {message.device_id} was "
                             "replaced by a newer one (a replay, or a copy from before a "
                             "re-flash)", clear_retained=inbound.retained)
            refused = {id(inbound) for inbound, _ in stale}
            accepted = [item for item in part if id(item[0]) not in refused]
            if accepted:
                self._accepted(accepted)

    def _decode(self, message: Inbound) -> DeviceMessageT | None:
        """The message, or None once it is refused (and acknowledged)."""
        if not message.payload and message.topic.rsplit("/", 1)[-1] in RETAINED_CHANNELS:
            # A retained message being cleared (by us or by the device), as the broker
            # forwards it to subscribers: nothing to store, nothing wrong.
            self.metrics.cleared()
            message.ack()
            return None
        try:
            return decode_device_message(message.topic, message.payload)
        except MessageRejected as exc:
            self._refuse(message, exc.reason, str(exc))
        except Exception as exc:  # a parser defect costs this message, not the batch
            log.error("cannot decode the message on %s", message.topic, exc_info=exc)
            self._refuse(message, "undecodable", f"{type(exc).__name__}: {exc}")
        return None

    def _refuse(
        self, message: Inbound, reason: str, text: str, clear_retained: bool = True
    ) -> None:
        """``clear_retained`` False: the message may not be the topic's retained one (a
        live copy of a former incarnation's message: the retained one is the device's
        current), so it is left alone."""
        self.metrics.reject(reason)
        self._log_refusal(reason, "refused message on %s: %s", message.topic, text)
        if clear_retained and message.topic.rsplit("/", 1)[-1] in RETAINED_CHANNELS:
            # Refused live or replayed, it is (or was published as) the topic's retained
            # message: left there, every (re)starting worker would be sent it again.
            self._clear_retained(message.topic)
        message.ack()

    def _clear_retained(self, topic_name: str) -> None:
        """Delete a refused retained message at the broker, so that it is not refused
        again after every restart (and by every worker)."""
        try:
            self.link.publish(topic_name, b"", qos=1, retain=True)
        except Exception as exc:  # the link is down: the next start clears it
            log.warning("could not clear the retained message on %s: %s", topic_name, exc)

    def _store_retrying(
        self, decoded: list[tuple[Inbound, DeviceMessageT]]
    ) -> list[tuple[Inbound, DeviceMessageT]]:
        """Store, retrying while the database is away (server gone, deadlock, lock
        timeout: ``OperationalError``); any other failure is the batch's own. Returns the
        messages refused as replays of a former incarnation (nothing of them stored)."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                return self._store(decoded)
            except OperationalError as exc:
                log.warning("batch not stored (%s); retrying in %.1fs", exc.orig, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise _Stopping

    def _accepted(self, decoded: list[tuple[Inbound, DeviceMessageT]]) -> None:
        now = utcnow()
        lag_s = max((now - item.sent_at).total_seconds() for _, item in decoded)
        for kind, count in Counter(item.kind for _, item in decoded).items():
            self.metrics.accept(kind, lag_s=lag_s, count=count)
        for message, _ in decoded:
            message.ack()

    def _store(
        self, decoded: list[tuple[Inbound, DeviceMessageT]]
    ) -> list[tuple[Inbound, DeviceMessageT]]:
        """One transaction for the whole batch. Applying twice changes nothing, so a retry
        after a failed commit is safe. Returns what was refused as a former incarnation's
        (``fleet.devices.admit``: judged in the transaction, refused after it commits)."""
        with Session(self.engine) as session:
            devices.lock_devices(session, {m.device_id for _, m in decoded})
            admission = devices.admit(session, [m for _, m in decoded])
            stale = [item for item, epoch in zip(decoded, admission.epochs, strict=True)
                     if epoch is None]
            kept = [(inbound, message, epoch) for (inbound, message), epoch
                    in zip(decoded, admission.epochs, strict=True) if epoch is not None]
            beats = [(m, e) for _, m, e in kept if isinstance(m, HeartbeatTelemetry)]
            # Status, reported, events and drift edit device rows field by field (rare
            # messages); heartbeats, the bulk, update theirs in one statement.
            devices.load_devices(
                session, {m.device_id for _, m, _ in kept if not isinstance(m, HeartbeatTelemetry)}
            )
            for inbound, message, epoch in kept:
                fresh = not inbound.retained
                if not admission.applies(message, epoch):
                    # Before its device's restart in this batch: stored, not applied.
                    devices.touch(session, message.device_id)
                elif isinstance(message, StatusMessage):
                    devices.apply_status(session, message, fresh)
                elif isinstance(message, ReportedState):
                    devices.apply_reported(session, message, fresh)
            stored = telemetry.store_heartbeats(session, [m for m, _ in beats],
                                                [e for _, e in beats])
            devices.apply_heartbeats(session, [m for m, e in beats if admission.applies(m, e)])
            for _, event, epoch in kept:
                if isinstance(event, EventMessage) and devices.apply_event(session, event, epoch):
                    rollout_store.on_event(session, event)  # new, not a redelivered copy
            drift = [m for _, m, _ in kept if isinstance(m, DriftMessage)]
            for device_id in {m.device_id for m in drift}:
                devices.touch(session, device_id)
            alerts = drift_store.apply_drift(session, drift, notify=self.notify_drift)
            session.commit()
        self.metrics.stored(stored)  # after the commit: a retried batch is counted once
        for note in alerts:
            self.metrics.drift_alert(note.change)
            log.warning("drift alert %s: %s on %s v%d, score %.2f%s", note.change,
                        note.device_id, note.model, note.version, note.score,
                        f" ({', '.join(note.features[:5])})" if note.features else "")
        if alerts and self.on_drift_alert is not None:
            self.on_drift_alert()
        return stale
