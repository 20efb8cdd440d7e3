"""Live drift windows for the serving bundle: observe requests, close windows, yield counts.

:meth:`DriftWindow.observe` runs on the request path after every inference, so it does
as little as possible there: it copies the rows it keeps (the raw tensors, not their
summaries) into a preallocated block per tensor, under one lock held for a few
microseconds. When a block fills, the whole block is summarised and binned with
vectorised numpy (:mod:`agent.drift.summaries`, :class:`~agent.drift.bins.BlockBinner`),
so the per-row cost is a share of one sort, not a Python call per feature. A tensor whose
rows are large (an image, a second of audio) skips the block: its rows are summarised
and binned at once, outside the lock, and only the counts are added under it.

**Sampling.** Counting every row of a saturated device would cost more than the model
for a small one (binning is ~5 ns a value; a small MLP's inference is about that per
input value). So at most ``sample_rate`` rows a second are binned: below that every row
is, above it one row in ``stride`` on average. The stride is re-estimated from the rows
served once a second (at a kept row or a poll) and at once on a burst. The gap from one
kept row to the next is drawn uniformly from 1 to ``2 * stride - 1``, so a client cycling
through N sources is not aliased onto one of them as a fixed stride would be; within a
batch kept rows are ``stride`` apart. Every row has the same chance whatever the batch
sizes; the report says how many rows were served (``rows``) and how many binned
(``binned``). ``sample_rate=None`` bins every row.

**Windows** close after ``window_s`` seconds or once ``max_rows`` rows are binned (the
request that reaches it included), whichever comes first. Time is checked whenever a row
is kept and on :meth:`poll` (a request that keeps no row reads no clock: under load that
is most of them), so a window may run on until the next kept row or poll, and its
``ended_at`` says when it did close. A window in which no row was binned closes silently.
A closed window becomes a :class:`WindowReport` (counts in the k + 3 layout of
``agent.contract``, the bundle it belongs to) in a small queue that :meth:`poll` empties;
nothing here publishes or writes. :meth:`reset` moves to another bundle's plan (or to
none): the current window closes as a report of the old bundle, and an observe that
started before the reset is dropped, not counted for the new one. (A request the old
model answered but observed after the reset would count for the new one: the caller
resets once the old model is drained, as ``ModelHost.swap`` drains it, or drops such
requests itself.)

Thread-safety: every method may be called from any thread. The clock is injectable
(``clock``: monotonic seconds; ``wall``: the timestamps reported), so tests need no sleep.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import msgspec
import numpy as np

from agent.contract import (
    MAX_DRIFT_FEATURES,
    MAX_MESSAGE_BYTES,
    ActiveModel,
    DriftMessage,
    FeatureHistogram,
    utcnow,
)
from agent.drift.bins import BlockBinner
from agent.drift.plan import DriftPlan, TrackedTensor
from agent.drift.summaries import summarise

__all__ = [
    "DEFAULT_MAX_ROWS",
    "DEFAULT_SAMPLE_RATE",
    "DEFAULT_WINDOW_S",
    "DriftWindow",
    "WindowReport",
]

DEFAULT_WINDOW_S = 300.0
# Rows binned per second at most: 75,000 in a 5-minute window, where the sampling noise in
# PSI over 20 bins is ~(bins - 1) / n = 2.5e-4, far below any alert level (0.1-0.25). A
# kept row costs a request ~5-7 us (cold caches), a request that keeps none ~1 us.
DEFAULT_SAMPLE_RATE = 250.0
DEFAULT_MAX_ROWS = 100_000  # closes a window before its time only when sampling is off
MAX_READY = 16  # closed windows waiting for poll(); older ones are dropped (and counted)
BLOCK_BYTES = 1 << 20  # one tensor's block of raw rows
MAX_BLOCK_ROWS = 4096
MIN_BLOCK_ROWS = 64  # rows larger than BLOCK_BYTES / 64 are binned at once, not blocked
_RATE_PERIOD_S = 1.0
_NEVER = 1 << 62
_MESSAGE_BUDGET = MAX_MESSAGE_BYTES - 2048  # room for the envelope around the features
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True)
class WindowReport:
    """A closed window: per feature, k + 3 counts over the baseline's edges."""

    model: ActiveModel
    started_at: datetime
    ended_at: datetime
    rows: int  # rows served while the window was open
    binned: int  # rows counted in the histograms (all of them unless sampled)
    reason: str  # "time", "rows", "reset" or "close"
    features: tuple[FeatureHistogram, ...]

    def messages(
        self, device_id: str, next_seq: Callable[[], int], sent_at: datetime | None = None
    ) -> list[DriftMessage]:
        """The window as drift messages, split to fit :data:`MAX_DRIFT_FEATURES` features
        and the message size bound; ``next_seq`` gives each its seq (the agent's)."""
        sent_at = sent_at or utcnow()
        chunks: list[list[FeatureHistogram]] = [[]]
        size = 0
        for feature in self.features:
            cost = len(_ENCODER.encode(feature)) + 1
            if chunks[-1] and (size + cost > _MESSAGE_BUDGET
                               or len(chunks[-1]) == MAX_DRIFT_FEATURES):
                chunks.append([])
                size = 0
            chunks[-1].append(feature)
            size += cost
        return [
            DriftMessage(device_id=device_id, seq=next_seq(), sent_at=sent_at,
                         model=self.model, features=chunk, rows=self.rows,
                         window_started_at=self.started_at)
            for chunk in chunks if chunk
        ]


class _Track:
    """One tensor's block of raw rows and where its counts live in the window's vector."""

    __slots__ = ("absent", "binner", "block", "capacity", "dtype", "is_output", "missing",
                 "name", "pos", "row_shape", "span", "tensor")

    def __init__(self, tensor: TrackedTensor, offset: int) -> None:
        self.tensor = tensor
        self.name = tensor.name
        self.is_output = tensor.is_output
        self.binner = BlockBinner(tensor.edges)
        self.span = slice(offset, offset + self.binner.size)
        self.missing = np.array([offset + s.stop - 1 for s in self.binner.spans])
        self.block: np.ndarray | None = None  # allocated on the first rows seen
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.capacity = 0
        self.pos = 0
        self.absent = 0  # rows of this window whose tensor was not given

    def count(self, rows: np.ndarray) -> np.ndarray | None:
        """Summarise and bin ``rows``; None when they do not fit the summary."""
        try:
            return self.binner.count(summarise(self.tensor.spec, rows))
        except ValueError:  # SummaryError, or rows numpy cannot read as the summary needs
            return None


class DriftWindow:
    """Drift windows of the serving bundle (see the module docstring)."""

    def __init__(
        self,
        plan: DriftPlan | None = None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_rows: int = DEFAULT_MAX_ROWS,
        sample_rate: float | None = DEFAULT_SAMPLE_RATE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        if window_s <= 0 or max_rows < 1 or (sample_rate is not None and sample_rate <= 0):
            raise ValueError("window_s, max_rows and sample_rate must be positive")
        self.window_s = window_s
        self.max_rows = max_rows
        self.sample_rate = sample_rate
        self._burst = math.ceil(2 * sample_rate * _RATE_PERIOD_S) if sample_rate else _NEVER
        self._clock = clock
        self._wall = wall
        self._random = (rng or random.Random()).random
        self._lock = threading.Lock()
        self._ready: deque[WindowReport] = deque()
        self.dropped = 0  # closed windows dropped because nobody polled
        self._install(plan, clock())

    @property
    def plan(self) -> DriftPlan | None:
        return self._plan

    def _install(self, plan: DriftPlan | None, now: float) -> None:
        self._plan = plan
        tracks: list[_Track] = []
        offset = 0
        for tensor in plan.tensors if plan is not None else ():
            tracks.append(_Track(tensor, offset))
            offset = tracks[-1].span.stop
        self._tracks = tuple(tracks)
        self._counts = np.zeros(offset, np.int64)
        self._stride = 1
        self._next_keep = 0  # the next row to bin, counted like _next_row
        self._next_row = 0  # rows served since the plan was installed
        self._rate_mark = 0  # _next_row when the stride was last estimated
        self._rate_since = now
        self._rate_at = math.inf
        self._rate_rows_at = _NEVER
        if self.sample_rate is not None:
            self._rate_at = now + _RATE_PERIOD_S
            self._rate_rows_at = self._burst
        self._start(now)

    def _start(self, now: float) -> None:
        self._started_at = self._wall()
        self._deadline = now + self.window_s
        self._seen = 0
        self._binned = 0

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Count one request: the arrays the engine ran, batch first, and what it answered,
        by tensor name. Never raises for the data: rows that do not fit their summary, and
        tracked tensors not given, count as missing.

        Written for the request path: locals over attributes, one lock, no call per row.
        A request that keeps no row costs ~0.6-1 us (the lock, mostly); one that keeps
        rows a few more (a clock read and a slice copy per tensor); bench/drift_device.py."""
        tracks = self._tracks
        if not tracks:
            return
        lead = tracks[0]
        array = (outputs if lead.is_output else inputs).get(lead.name)
        rows = self._rows_of(inputs, outputs) if array is None else (
            array.shape[0] if array.ndim else 0)
        if not rows:
            return
        with self._lock:
            if tracks is not self._tracks:  # reset meanwhile: these rows are another model's
                return
            row = self._next_row
            self._next_row = row + rows
            if row >= self._rate_rows_at:
                self._adapt(self._clock())
            stride = self._stride
            if stride == 1:
                taken, pick = rows, None
            else:
                first = self._next_keep - row
                if first >= rows:  # most requests under load: no row kept, no clock read
                    self._seen += rows
                    return
                taken = (rows - 1 - first) // stride + 1
                pick = slice(first, None, stride)
                # The gap from the last kept row is 1 .. 2 * stride - 1, but never back
                # into this request: a next row before its end would give the next
                # request a negative offset (its last row, once per slot of the block).
                self._next_keep = max(row + rows, row + first + (taken - 1) * stride + 1 + int(
                    self._random() * (2 * stride - 1)))
            now = self._clock()
            if now >= self._deadline:
                self._close(now, "time")
            if now >= self._rate_at:
                self._adapt(now)
            self._seen += rows
            deferred: list[tuple[_Track, np.ndarray]] = []
            for track in tracks:
                array = (outputs if track.is_output else inputs).get(track.name)
                if array is None:
                    track.absent += taken
                    continue
                part = array if pick is None else array[pick]
                block = track.block
                if (block is not None and part.shape[1:] == track.row_shape
                        and part.dtype == track.dtype and taken <= track.capacity):
                    pos = track.pos
                    if pos + taken > track.capacity:
                        self._flush(track)
                        pos = 0
                    block[pos : pos + taken] = part
                    track.pos = pos + taken
                elif track.row_shape is None and self._allocate(track, part):
                    block = track.block
                    assert block is not None
                    block[:taken] = part
                    track.pos = taken
                else:
                    deferred.append((track, part))
            binned = self._binned + taken
            self._binned = binned
            if not deferred:
                if binned >= self.max_rows:
                    self._close(now, "rows")
                return
        # Large rows: summarised and binned here, outside the lock; only counts go under it.
        counted = [(track, track.count(part), len(part)) for track, part in deferred]
        with self._lock:
            if tracks is not self._tracks:
                return
            for track, counts, taken in counted:
                if counts is None:
                    track.absent += taken
                else:
                    self._counts[track.span] += counts
            if self._binned >= self.max_rows:
                self._close(self._clock(), "rows")

    def _rows_of(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
                 ) -> int:
        """The batch size: the rows of the first tracked tensor given (0: none is)."""
        for track in self._tracks:
            array = (outputs if track.is_output else inputs).get(track.name)
            if array is not None:
                return array.shape[0] if array.ndim else 0
        return 0

    def _allocate(self, track: _Track, part: np.ndarray) -> bool:
        """Give ``track`` a block shaped like ``part``'s rows, unless they are too large to
        block (then they are binned as they come). True when it got one."""
        track.row_shape = part.shape[1:]
        track.dtype = part.dtype
        row_bytes = max(1, part.dtype.itemsize * math.prod(track.row_shape))
        capacity = min(MAX_BLOCK_ROWS, BLOCK_BYTES // row_bytes)
        if capacity < MIN_BLOCK_ROWS:
            return False
        track.capacity = capacity
        track.block = np.empty((capacity, *track.row_shape), part.dtype)
        return len(part) <= capacity

    def _flush(self, track: _Track) -> None:
        if track.pos:
            assert track.block is not None
            counts = track.count(track.block[: track.pos])
            if counts is None:
                track.absent += track.pos
            else:
                self._counts[track.span] += counts
            track.pos = 0

    def _adapt(self, now: float) -> None:
        """Re-estimate the stride from the last period's rows; the next kept row is a random
        one of the next ``stride``."""
        assert self.sample_rate is not None
        rate = (self._next_row - self._rate_mark) / max(now - self._rate_since, 1e-6)
        self._stride = max(1, math.ceil(rate / self.sample_rate))
        self._next_keep = self._next_row + int(self._random() * self._stride)
        self._rate_mark = self._next_row
        self._rate_since = now
        self._rate_at = now + _RATE_PERIOD_S
        # A burst re-estimates at once: twice the rows a period should bring at this stride.
        self._rate_rows_at = self._next_row + self._burst * self._stride

    def _close(self, now: float, reason: str) -> None:
        """Close the window (lock held): queue its report if any row was binned, start the
        next one."""
        for track in self._tracks:
            self._flush(track)
        plan = self._plan
        if self._binned and plan is not None:
            counts = self._counts
            for track in self._tracks:
                if track.absent:
                    counts[track.missing] += track.absent
                    track.absent = 0
            features = tuple(
                FeatureHistogram(feature=name, counts=counts[track.span][span].tolist())
                for track in self._tracks
                for name, span in zip(track.tensor.features, track.binner.spans, strict=True)
            )
            if len(self._ready) == MAX_READY:
                self._ready.popleft()
                self.dropped += 1
            self._ready.append(WindowReport(
                model=plan.model, started_at=self._started_at, ended_at=self._wall(),
                rows=self._seen, binned=self._binned, reason=reason, features=features,
            ))
            counts[:] = 0
        self._start(now)

    def poll(self) -> list[WindowReport]:
        """The windows closed since the last call, oldest first; closes the current one if
        its time is up. Call it periodically (every few seconds)."""
        with self._lock:
            now = self._clock()
            if now >= self._deadline:
                self._close(now, "time")
            if now >= self._rate_at:
                self._adapt(now)
            ready = list(self._ready)
            self._ready.clear()
        return ready

    def close(self) -> list[WindowReport]:
        """Close the current window now (e.g. the agent stopping) and return every report."""
        with self._lock:
            self._close(self._clock(), "close")
            ready = list(self._ready)
            self._ready.clear()
        return ready

    def reset(self, plan: DriftPlan | None = None) -> None:
        """The serving model changed: close the current window as the old bundle's report
        (still queued for :meth:`poll`), then track ``plan`` (None: nothing) from zero."""
        with self._lock:
            now = self._clock()
            self._close(now, "reset")
            self._install(plan, now)
