"""Inference counters and recent-latency percentiles for the agent's health reports.

Memory is bounded whatever the uptime: latencies live in a ring buffer of the last ``window``
samples, so p50/p95 describe recent behaviour, while the counters cover the whole process
lifetime; a model swap restarts the latency window, so the percentiles are always the
serving model's. Only successful inferences contribute latencies; a request refused in microseconds
would otherwise pull the percentiles down exactly when something is wrong. All methods are
safe to call from several threads.

Client errors (a request that does not fit the model: wrong shape, bad JSON, a value the
runtime refuses as the caller's mistake) are counted apart from model errors (the runtime
failed on a valid request). Rollouts halt on the model error rate, so a buggy application
on the device must not make a good model look bad.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

__all__ = ["DEFAULT_WINDOW", "InferenceStats"]

DEFAULT_WINDOW = 1024


class InferenceStats:
    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, given {window}")
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._count = 0
        self._errors = 0
        self._client_errors = 0

    def record(self, latency_s: float, ok: bool = True) -> None:
        """Count one inference; ``latency_s`` is wall time in seconds (ignored when not ok)."""
        if ok and not latency_s >= 0:  # also refuses NaN: heartbeats require p50/p95 >= 0
            raise ValueError(f"latency must be a non-negative number of seconds, given {latency_s}")
        with self._lock:
            self._count += 1
            if ok:
                self._latencies.append(latency_s)
            else:
                self._errors += 1

    def restart_latencies(self) -> None:
        """Forget the recent latencies (the model changed); the counters go on."""
        with self._lock:
            self._latencies.clear()

    def record_client_error(self) -> None:
        """Count one request refused as the caller's mistake (a 4xx): not an inference."""
        with self._lock:
            self._client_errors += 1

    def snapshot(self) -> dict[str, int | float | None]:
        """Counters since start and latency percentiles (ms) over the window; None if empty."""
        with self._lock:
            count, errors, client_errors = self._count, self._errors, self._client_errors
            latencies = np.fromiter(self._latencies, dtype=np.float64)
        p50 = p95 = None
        if latencies.size:
            p50, p95 = (float(v) * 1000.0 for v in np.percentile(latencies, [50, 95]))
        return {
            "inference_count": count,
            "error_count": errors,
            "client_error_count": client_errors,
            "latency_ms_p50": p50,
            "latency_ms_p95": p95,
        }
