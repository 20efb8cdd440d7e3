"""How long a bundle download may take, and how slowly it may trickle.

A per-read socket timeout alone does not bound a download: a server (or a middlebox) that
sends one byte per second never times out a read, and the device would sit on that
download forever while a newer desired state waits behind it. So every download has

* an overall **deadline**: ``deadline_s`` plus the signed length at the floor rate (a
  bigger bundle may take longer), counting reconnects and the pauses between tries;
* a **throughput floor**: once the download has run for ``window_s``, the bytes received
  over the last ``window_s`` must average at least ``floor_bps`` (0 turns the floor off).

:class:`DownloadMeter` decides, without IO, from (time, bytes received) samples.
:class:`DownloadWatch` is the IO around it: a small thread that samples the meter and,
when it says stop (or the install is cancelled), shuts the connection down so the blocked
read returns at once. The reading thread then raises
:class:`~agent.errors.DownloadError` with the meter's words (``too slow: 12 B/s over the
last 60 s, floor 1024 B/s`` or ``deadline exceeded: ...``), or
:class:`~agent.errors.CancelledError`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from agent.cancel import Cancel
from agent.errors import DownloadError

__all__ = ["DownloadLimits", "DownloadMeter", "DownloadWatch"]


@dataclass(frozen=True)
class DownloadLimits:
    """Defaults fit a flaky cellular link: 1 KiB/s is far below any link worth using and
    a minute rides out a handover; a 100 MB bundle gets 5 min + ~28 h before the deadline
    (the floor normally ends a bad download long before that)."""

    deadline_s: float = 300.0
    floor_bps: float = 1024.0
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ValueError(f"download deadline must be greater than 0, given {self.deadline_s}")
        if self.floor_bps < 0:
            raise ValueError(f"download floor must be 0 (off) or more, given {self.floor_bps}")
        if self.window_s <= 0:
            raise ValueError(f"download window must be greater than 0, given {self.window_s}")

    def deadline_for(self, length: int) -> float:
        """Seconds a download of ``length`` signed bytes may take, all tries together."""
        extra = length / self.floor_bps if self.floor_bps > 0 else 0.0
        return self.deadline_s + extra


class DownloadMeter:
    """Pure: fed ``observe(now, received)``, says why the download must stop, or None."""

    def __init__(self, limits: DownloadLimits, length: int, now: float) -> None:
        self.limits = limits
        self.length = length
        self.started = now
        self.allowed_s = limits.deadline_for(length)
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])

    def observe(self, now: float, received: int) -> str | None:
        limits = self.limits
        elapsed = now - self.started
        if elapsed >= self.allowed_s:
            return (
                f"deadline exceeded: {elapsed:.0f} s, allowed {self.allowed_s:.0f} s for "
                f"{self.length} bytes ({received} received)"
            )
        self._samples.append((now, received))
        # Keep one sample at or before the window's start: the rate spans the whole window.
        while len(self._samples) > 1 and self._samples[1][0] <= now - limits.window_s:
            self._samples.popleft()
        if limits.floor_bps <= 0 or elapsed < limits.window_s:
            return None
        since, then = self._samples[0]
        rate = (received - then) / max(now - since, 1e-9)
        if rate < limits.floor_bps:
            return (
                f"too slow: {rate:.0f} B/s over the last {now - since:.0f} s, "
                f"floor {limits.floor_bps:.0f} B/s"
            )
        return None


class _Interruptible(Protocol):
    def shutdown(self) -> None: ...


def _shutdown(response: _Interruptible | None) -> None:
    """Make a blocked read on ``response`` return now (its socket is shut down)."""
    if response is None:
        return
    # RuntimeError: the body was read to its end and the connection is back in the pool
    with contextlib.suppress(RuntimeError):
        response.shutdown()


class DownloadWatch:
    """The IO around a :class:`DownloadMeter`, for one download (a context manager)."""

    def __init__(
        self,
        limits: DownloadLimits,
        length: int,
        cancel: Cancel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.meter = DownloadMeter(limits, length, clock())
        self.cancel = cancel or Cancel()
        self.received = 0  # bytes received by this download (written by the reader only)
        self._verdict: str | None = None
        self._stopped = threading.Event()  # the meter said stop, or the cancel came
        self._done = threading.Event()  # the download is over: the thread may end
        self._lock = threading.Lock()
        self._response: _Interruptible | None = None
        self._tick = min(1.0, limits.window_s / 10, max(self.meter.allowed_s / 10, 0.01))
        self._thread = threading.Thread(target=self._run, name="download-watch", daemon=True)

    def __enter__(self) -> DownloadWatch:
        self._unregister = self.cancel.on_cancel(self._interrupt)
        self._unregister.__enter__()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()
        self._unregister.__exit__(None, None, None)

    def _run(self) -> None:
        while not self._done.wait(self._tick):
            verdict = self.meter.observe(self._clock(), self.received)
            if verdict is not None:
                self._verdict = verdict
                self._interrupt()
                return

    def _interrupt(self) -> None:
        self._stopped.set()
        with self._lock:  # not while the reader hands the connection back to its pool
            _shutdown(self._response)

    def attach(self, response: _Interruptible | None) -> None:
        """The response being read (None when done): what an interrupt shuts down."""
        with self._lock:
            self._response = response
            if self._stopped.is_set():
                _shutdown(response)

    def check(self) -> None:
        """Raise if the download must stop: cancelled, too slow or past its deadline."""
        self.cancel.check()
        if self._verdict is not None:
            raise DownloadError(self._verdict)

    def sleep(self, seconds: float) -> None:
        """A pause between tries that ends early if the download must stop."""
        self._stopped.wait(seconds)
        self.check()

    def remaining(self) -> float:
        """Seconds until the deadline: bounds the timeouts of each request."""
        return max(self.meter.started + self.meter.allowed_s - self._clock(), 0.01)
