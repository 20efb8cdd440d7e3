"""A one-shot cancel signal for one long update step, and the way it reaches blocked IO.

Why a signal and not a flag the worker polls: a bundle download can sit in a blocking
socket read for as long as the server wants. :meth:`Cancel.cancel` therefore runs the
callbacks registered with :meth:`Cancel.on_cancel` (a download registers one that shuts its
connection down), so the blocked read returns at once, and the worker then raises
:class:`~agent.errors.CancelledError` at its next :meth:`Cancel.check`.

A cancel is never undone: a new operation gets a new :class:`Cancel`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from agent.errors import CancelledError

__all__ = ["Cancel"]

log = logging.getLogger(__name__)


class Cancel:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._reason: str | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def reason(self) -> str | None:
        """Why it was cancelled (e.g. ``superseded by generation 7``), or None."""
        return self._reason

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            callbacks = list(self._callbacks)
        self._event.set()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # an unblocking callback must not stop the others
                log.exception("cancel callback failed")

    def check(self) -> None:
        """Raise :class:`CancelledError` if cancelled: call between steps."""
        if self._reason is not None:
            raise CancelledError(self._reason)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as (or if already) cancelled."""
        return self._event.wait(seconds)

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Run ``callback`` if cancelled while inside the block (at once if already)."""
        with self._lock:
            already = self._reason is not None
            if not already:
                self._callbacks.append(callback)
        if already:
            callback()
        try:
            yield
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)
