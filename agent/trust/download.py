"""How long a bundle download may take, and how slowly it may trickle.

A per-read socket timeout alone does not bound a download: a server (or a middlebox) that
sends one byte per second never times out a read, and the device would sit on that
download forever while a newer desired state waits behind it. So every download has

* an overall **deadline**: ``deadline_s`` plus the signed length at the floor rate (a
  bigger bundle may take longer), counting reconnects and the pauses between tries;
* a **throughput floor**: once the download has run for ``window_s``, the bytes received
  over the last ``window_s`` must average at least ``floor_bps`` (0 turns the floor off);
* optionally a **rate cap** (``max_rate_bps``, 0 = none): the device's own application
  traffic shares the link, so the reader takes bytes no faster than the cap
  (:class:`TokenBucket`); the socket's receive buffer fills and TCP slows the sender.

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

__all__ = ["DownloadLimits", "DownloadMeter", "DownloadWatch", "TokenBucket", "retry_pause"]


@dataclass(frozen=True)
class DownloadLimits:
    """Defaults fit a flaky cellular link: 1 KiB/s is far below any link worth using and
    a minute rides out a handover; a 100 MB bundle gets 5 min + ~28 h before the deadline
    (the floor normally ends a bad download long before that)."""

    deadline_s: float = 300.0
    floor_bps: float = 1024.0
    window_s: float = 60.0
    max_rate_bps: float = 0.0  # bytes/s; 0: no cap

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ValueError(f"download deadline must be greater than 0, given {self.deadline_s}")
        if self.floor_bps < 0:
            raise ValueError(f"download floor must be 0 (off) or more, given {self.floor_bps}")
        if self.window_s <= 0:
            raise ValueError(f"download window must be greater than 0, given {self.window_s}")
        if self.max_rate_bps < 0:
            raise ValueError(f"download rate cap must be 0 (off) or more, given "
                             f"{self.max_rate_bps * 8 / 1000:g} kbps")
        if 0 < self.max_rate_bps <= self.floor_bps:
            # Every capped download would end as "too slow".
            raise ValueError(
                f"download rate cap {self.max_rate_bps * 8 / 1000:g} kbps "
                f"({self.max_rate_bps:.0f} B/s) must be above the download floor "
                f"({self.floor_bps:.0f} B/s)"
            )

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


class TokenBucket:
    """Pure: how long the reader waits after taking ``n`` bytes, for a cap of ``rate`` B/s.

    Bytes are taken as they arrive (the debt model: the balance may go below zero) and the
    reader pauses until the balance is back at zero, so over any stretch the bytes taken
    are at most ``rate`` x its duration + ``burst``. It starts empty: no burst at the start.
    """

    def __init__(self, rate: float, now: float, burst_s: float = 0.1) -> None:
        if rate <= 0:
            raise ValueError(f"a token bucket's rate must be greater than 0, given {rate}")
        self.rate = rate
        self.burst = max(int(rate * burst_s), 1024)  # also the largest read: smooth
        self._balance = 0.0
        self._at = now

    def take(self, n: int, now: float) -> float:
        """Take ``n`` bytes at ``now``; the seconds to wait before reading more."""
        self._balance = min(self.burst, self._balance + (now - self._at) * self.rate) - n
        self._at = now
        return -self._balance / self.rate if self._balance < 0 else 0.0


def retry_pause(stalled: int, jitter: float = 1.0) -> float:
    """Seconds before the next try of a dropped download: short after a try that got
    further (``stalled`` 0: a link that drops every few hundred KB keeps most of its rate),
    doubling with each try in a row that got no byte further, at most 10 s. ``jitter`` in
    [0.5, 1] spreads the devices of a fleet whose link dropped at once."""
    return min(0.2 * 2**stalled, 10.0) * jitter


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
