"""The ingest metrics stay bounded however long the worker runs.

Mocked boundary: the clock (``time.monotonic`` in ``fleet.ingest``), so an hour of traffic
takes no time.
"""

from __future__ import annotations

from fleet import ingest
from fleet.ingest import RATE_WINDOW_S, IngestMetrics


def test_rate_window_memory_is_bounded_and_the_rate_counts_only_the_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ingest.time, "monotonic", lambda: clock[0])
    metrics = IngestMetrics()
    for _ in range(3600):  # an hour, 50 messages a second
        metrics.accept("telemetry", lag_s=0.1, count=50)
        clock[0] += 1.0
    assert len(metrics._per_second) <= RATE_WINDOW_S + 1
    snapshot = metrics.snapshot()
    assert snapshot["accepted"] == {"telemetry": 3600 * 50}
    assert snapshot["messages_per_s"] == 50  # the last 10 whole seconds

    metrics.accept("telemetry", count=500)  # the current second does not count yet
    assert metrics.snapshot()["messages_per_s"] == 50

    clock[0] += 2 * RATE_WINDOW_S  # quiet: the rate falls to zero
    assert metrics.snapshot()["messages_per_s"] == 0
