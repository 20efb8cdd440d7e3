"""Keeps the repository's short-lived metadata fresh while the fleet runs.

Timestamp metadata expires after a day on purpose: a device that is fed an old, still
validly signed timestamp (a freeze attack) notices once it expires. The price is that the
running fleet must re-sign it well before then; this thread does, every ``interval_s``,
re-signing whatever is past half its lifetime.
"""

from __future__ import annotations

import logging
import threading

from fleet.trust.repository import FleetRepository

__all__ = ["MetadataRefresher"]

log = logging.getLogger(__name__)


class MetadataRefresher:
    def __init__(self, repository: FleetRepository, interval_s: float = 60.0) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tuf-refresher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            try:
                bumped = self.repository.refresh_expiring()
                if bumped:
                    log.info("re-signed %s metadata", " and ".join(bumped))
            except Exception:  # keep trying: an expired timestamp stops every update
                log.exception("metadata refresh failed")
            if self._stop.wait(self.interval_s):
                return
