"""The agent's durable state: a small SQLite file in the state directory.

Why SQLite and not a JSON file: the sequence counter must survive power loss without ever
going backwards (the fleet drops a message whose ``seq`` it has already stored), and SQLite
gives an atomic, fsynced update per call without a hand-written write-rename dance.

Invariants:

* :meth:`AgentState.next_seq` never returns the same number twice for one state file, even
  across crashes: a block of numbers is committed as used before any is handed out. A new
  state file starts from the wall clock in microseconds, so a wiped device keeps counting
  upwards.
* the accepted desired state is only replaced by one with a greater ``generation``.
* :attr:`AgentState.incarnation` is a random id made with the state file and kept for its
  life. Messages carry it beside ``seq``: a wiped state directory (re-flash, new SD card)
  starts a new incarnation, so the fleet restarts the device's sequence instead of ignoring
  it while a clock behind keeps the new ``seq`` below the old one. A state file from before
  incarnations gets one on first open; its ``seq`` goes on, so the fleet sees no restart.

Besides, the file keeps what enrollment learnt (``fleet_url``, ``broker_url``) and the id
the daemon last ran as (``device_id``); :func:`peek` reads them without creating anything,
for ``edge-agent status`` and ``run``, whether or not a daemon holds the directory.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from pathlib import Path

from agent.contract import DesiredState, decode, to_json

__all__ = ["SEQ_BLOCK", "AgentState", "is_enrolled", "peek", "root_path"]

SEQ_BLOCK = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def root_path(state_dir: Path) -> Path:
    """The trusted TUF root pinned by ``edge-agent enroll`` (kept current by refreshes)."""
    return state_dir / "tuf" / "root.json"


def is_enrolled(state_dir: Path) -> bool:
    return root_path(state_dir).is_file()


def peek(state_dir: Path) -> dict[str, str]:
    """Every stored key of ``state_dir``'s state file, read-only; {} if there is none.

    Never creates the directory or the file (a mistyped ``--state-dir`` stays a mistake),
    and reads beside a running daemon (WAL: readers do not block the writer)."""
    path = state_dir / "agent.db"
    if not path.is_file():
        return {}
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT key, value FROM kv").fetchall())
    except sqlite3.OperationalError:  # no kv table yet: a file being created right now
        return {}
    finally:
        db.close()


class AgentState:
    """Key/value state of one agent; safe to share between the MQTT thread and the main loop."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "agent.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed seq must survive a power cut, or a reboot could reuse it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # Made once per state file, atomically (two openers agree on one); never replaced.
        self._db.execute("INSERT OR IGNORE INTO kv(key, value) VALUES('incarnation', ?)",
                         (secrets.token_hex(8),))
        self.incarnation: str = self._get("incarnation") or ""
        self._seq_next = self._seq_limit = 0  # nothing reserved yet

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _put(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_seq(self) -> int:
        """Reserve the next message sequence number.

        Numbers are reserved from disk in blocks (one fsync per ``SEQ_BLOCK`` messages, not
        per message: SD cards wear); a restart skips the rest of the block, so numbers only
        ever grow, with gaps.
        """
        with self._lock:
            if self._seq_next >= self._seq_limit:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    stored = self._get("seq")
                    # A fresh state starts at the clock in microseconds, not 0: a device
                    # whose state was wiped (re-flashed, new SD card) still counts above
                    # what the fleet stored for it, as long as its clock is not behind.
                    start = int(stored) if stored is not None else time.time_ns() // 1000
                    self._put("seq", str(start + SEQ_BLOCK))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._seq_next, self._seq_limit = start, start + SEQ_BLOCK
            self._seq_next += 1
            return self._seq_next

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._get(key)

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._put(key, value)

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    @property
    def fleet_url(self) -> str | None:
        return self.get("fleet_url")

    @property
    def broker_url(self) -> str | None:
        """The broker the fleet named at enrollment (mqtt://HOST:PORT, no credentials)."""
        return self.get("broker_url")

    @property
    def applied_generation(self) -> int:
        """The newest desired generation the agent has finished acting on (done or failed)."""
        return int(self.get("applied_generation") or 0)

    def mark_applied(self, generation: int) -> None:
        self.put("applied_generation", str(generation))

    def desired(self) -> DesiredState | None:
        with self._lock:
            raw = self._get("desired")
        return None if raw is None else decode(DesiredState, raw)

    def accept_desired(self, desired: DesiredState) -> bool:
        """Store ``desired`` if it is newer than the accepted one; False if it is not."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                raw = self._get("desired")
                current = None if raw is None else decode(DesiredState, raw)
                if current is not None and desired.generation <= current.generation:
                    self._db.execute("ROLLBACK")
                    return False
                self._put("desired", to_json(desired).decode())
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return True
