"""Background chores of a running fleet, each on its own timer thread.

Used for re-signing short-lived TUF metadata (a timestamp that expires stops every update:
see ``fleet.trust.repository``) and for telemetry retention. A failing run is logged and
tried again next time; it never ends the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    def __init__(
        self,
        name: str,
        interval_s: float,
        action: Callable[[], object],
        when: Callable[[], bool] | None = None,
    ) -> None:
        """``when``: asked before each run; a run it declines is skipped, not queued (the
        fleet's chores run only on the leading worker: ``fleet.leader``)."""
        self.name = name
        self.interval_s = interval_s
        self.action = action
        self.when = when
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            try:
                result = None if self.when is not None and not self.when() else self.action()
                if result:
                    log.info("%s: %s", self.name, result)
            except Exception:
                log.exception("%s failed; trying again in %.0fs", self.name, self.interval_s)
            if self._stop.wait(self.interval_s):
                return
