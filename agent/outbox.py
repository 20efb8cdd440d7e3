"""The durable outbox: telemetry, events and drift wait here until the broker has them.

Every device -> fleet message that is not retained state goes into a SQLite table first
(WAL), and leaves it only when the broker acknowledges it (PUBACK, QoS 1). So a broker
outage, a lost link or an agent restart loses nothing that fits the budget; the fleet
drops the duplicates a restart may cause, by ``seq``.

The budget is in bytes. When a new message does not fit, the lowest priority goes first,
oldest first: heartbeats (0) before drift sketches (1) before deployment events (2). Every
drop is counted per priority and reported in the heartbeat. A message past its expiry is
dropped instead of sent (counted as expired), and is sent with the MQTT v5 message expiry
that remains, so a broker does not deliver stale telemetry either.

Durability: WAL with ``synchronous=NORMAL``: an agent crash loses nothing; a power cut can
lose the last moment of writes (an fsync per heartbeat would wear SD cards).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRIORITY", "Outbox", "OutboxDrainer", "OutboxStats", "Pending"]

log = logging.getLogger(__name__)

PRIORITY = {"telemetry": 0, "drift": 1, "events": 2}
_NAMES = {value: key for key, value in PRIORITY.items()}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires REAL
);
CREATE INDEX IF NOT EXISTS outbox_victims ON outbox (priority, seq);
CREATE TABLE IF NOT EXISTS outbox_drops (
    what TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    seq: int
    channel: str
    payload: bytes
    expires: float | None


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    dropped: dict[str, int]


class Outbox:
    def __init__(self, path: Path, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._dropped = Counter(dict(self._db.execute("SELECT what, count FROM outbox_drops")))
        self.added = threading.Event()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, seq: int, channel: str, payload: bytes, expiry_s: float | None = None) -> None:
        """Store a message; evict by priority, then age, until the budget holds."""
        priority = PRIORITY[channel]
        expires = time.time() + expiry_s if expiry_s else None
        with self._lock:
            self._db.execute("BEGIN")
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                (seq, channel, priority, payload, len(payload), expires),
            ).rowcount
            if inserted:  # the same seq twice is one message
                self._depth += 1
                self._bytes += len(payload)
            while self._bytes > self.budget_bytes:
                victim = self._db.execute(
                    "SELECT seq, priority, size FROM outbox ORDER BY priority, seq LIMIT 1"
                ).fetchone()
                if victim is None:
                    break
                self._delete(victim[0], victim[2])
                self._count(_NAMES[victim[1]])
            self._db.execute("COMMIT")
        self.added.set()

    def _delete(self, seq: int, size: int) -> None:
        if self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount:
            self._depth -= 1
            self._bytes -= size

    def _count(self, what: str) -> None:
        self._dropped[what] += 1
        self._db.execute(
            "INSERT INTO outbox_drops VALUES (?, 1) "
            "ON CONFLICT(what) DO UPDATE SET count = count + 1",
            (what,),
        )

    def after(self, seq: int, limit: int) -> list[Pending]:
        """The oldest messages with a seq above ``seq``, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, channel, payload, expires FROM outbox WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [Pending(*row) for row in rows]

    def remove(self, seq: int, *, expired: bool = False) -> None:
        """The broker has it (or it went stale): forget it."""
        with self._lock:
            row = self._db.execute("SELECT size FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return
            self._delete(seq, row[0])
            if expired:
                self._count("expired")

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(self._depth, self._bytes, dict(self._dropped))


class OutboxDrainer:
    """Publishes the outbox in seq order while connected, at most ``rate`` messages a second
    and ``window`` unacknowledged at a time; rows are removed on PUBACK."""

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[Pending, float | None], int | None],
        connected: Callable[[], bool],
        *,
        rate: float = 200.0,
        window: int = 100,
    ) -> None:
        """``publish(pending, expiry_s)`` returns the MQTT message id, or None if it could
        not be handed to the client (it is then tried again later)."""
        self.outbox = outbox
        self._publish = publish
        self._connected = connected
        self.rate = rate
        self.window = window
        self._inflight: dict[int, int] = {}  # mid -> seq
        # PUBACKs whose mid is not (yet) ours: those that beat publish() returning the mid
        # to us (the MQTT client's lock must not be taken under ours: its network thread
        # calls us holding it), and those of messages published outside the outbox. The
        # time tells them apart: only an ack newer than our publish call can be its ack.
        self._early: dict[int, tuple[bool, float]] = {}
        self._cursor = 0  # highest seq handed to the MQTT client in this process
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.outbox.added.set()
        self._thread.join(timeout=5)

    def acknowledged(self, mid: int, ok: bool = True) -> None:
        """PUBACK for ``mid``; a refusal (e.g. not authorised) will not change on a resend."""
        with self._lock:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                if len(self._early) > 1000:
                    self._early.clear()  # stale acks of non-outbox messages
                self._early[mid] = (ok, time.monotonic())
                return
        self._settle(seq, ok)

    def _settle(self, seq: int, ok: bool) -> None:
        if not ok:
            log.warning("broker refused message seq %d; dropping it", seq)
        self.outbox.remove(seq)

    def _loop(self) -> None:
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            with self._lock:
                room = self.window - len(self._inflight)
            if not self._connected() or room <= 0:
                self._stop.wait(0.05)
                continue
            batch = self.outbox.after(self._cursor, min(room, 50))
            if not batch:
                self.outbox.added.clear()
                self.outbox.added.wait(0.5)
                continue
            for pending in batch:
                if self._stop.is_set() or not self._connected():
                    break
                remaining = None
                if pending.expires is not None:
                    remaining = pending.expires - time.time()
                    if remaining <= 0:
                        self.outbox.remove(pending.seq, expired=True)
                        self._cursor = pending.seq
                        continue
                started = time.monotonic()
                mid = self._publish(pending, remaining)
                if mid is None:
                    break
                with self._lock:
                    early = self._early.pop(mid, None)
                    if early is not None and early[1] < started:
                        early = None  # an old ack of another message with this mid
                    if early is None:
                        self._inflight[mid] = pending.seq
                if early is not None:
                    self._settle(pending.seq, early[0])
                self._cursor = pending.seq
                self._stop.wait(interval)
