"""Which fleet worker runs the periodic chores: the one holding a PostgreSQL advisory lock.

Several ``edge-fleet serve`` workers share one database and one broker; every one ingests
telemetry and answers the API, but the chores (re-signing metadata, telemetry retention,
the rollout controller, re-sending unacknowledged desired states) want one runner: two
re-signers would race over the same files, two resenders would publish twice.

Why a *session* advisory lock on a connection of its own: PostgreSQL releases it when the
session ends, and a worker that dies (SIGKILL, a lost machine) ends its session, so the
role moves without any lease to expire or clock to trust. The holder checks its connection
every :data:`CHECK_S`; if the check fails (the database restarted, the network broke) it
steps down at once, before PostgreSQL may have noticed, so two leaders overlap only while
a dead connection is still counted alive by the server — and each chore is safe under
that overlap anyway (the controller takes its own lock per tick and row locks; the
repository's writes take its lock, PostgreSQL's or a file lock on one machine; a resend
at worst repeats a publication the device ignores).

SQLite admits one fleet per data directory (``fleet.data_dir``), so there the only worker
always leads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

__all__ = ["ADVISORY_KEY", "CHECK_S", "Leadership"]

log = logging.getLogger(__name__)

# "edgefleet leader", as a positive bigint; distinct from the rollout controller's key.
ADVISORY_KEY = 0x6566_6C65_6164_6572 & 0x7FFF_FFFF_FFFF_FFFF
CHECK_S = 1.0


class Leadership:
    """A thread that takes the leader's lock when it is free and keeps it while it can.

    ``is_leader`` is what chores ask before each run; ``on_change(leading)`` is told each
    time the role comes or goes (for the log line an operator looks for)."""

    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        check_s: float = CHECK_S,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.check_s = check_s
        self._on_change = on_change
        self._always = engine.dialect.name != "postgresql"
        self._leading = self._always
        self._connection: Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leadership", daemon=True)

    @property
    def is_leader(self) -> bool:
        return self._leading

    def start(self) -> Leadership:
        if self._always:
            self._changed(True)
        else:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Step down and give the lock back at once (a clean stop hands over without
        waiting for the others' next check)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._release()

    # ------------------------------------------------------------------ internals

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._connection is None:
                    self._try_take()
                else:
                    self._connection.execute(text("SELECT 1")).scalar()
                    self._connection.commit()
            except Exception as exc:  # the database is away: nobody here leads
                if self._leading:
                    log.warning("leader: lost the database connection (%s); worker %s "
                                "steps down", exc.__class__.__name__, self.worker_id)
                self._release()
            self._stop.wait(self.check_s)

    def _try_take(self) -> None:
        connection = self.engine.connect()
        try:
            taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                            {"key": ADVISORY_KEY}).scalar())
            connection.commit()
        except Exception:
            connection.invalidate()
            connection.close()
            raise
        if not taken:
            connection.close()
            return
        self._connection = connection
        self._changed(True)

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # Invalidated, not returned to the pool: closing the session is what frees the
            # lock, whatever state the connection is in.
            try:
                connection.invalidate()
                connection.close()
            except Exception:  # already broken: the server frees the lock with the session
                log.debug("leader: closing the lock's connection failed", exc_info=True)
        if self._leading and not self._always:
            self._changed(False)

    def _changed(self, leading: bool) -> None:
        self._leading = leading
        if leading:
            log.info("leader: worker %s runs the fleet's chores now", self.worker_id)
        else:
            log.info("leader: worker %s no longer runs the fleet's chores", self.worker_id)
        if self._on_change is not None:
            self._on_change(leading)
