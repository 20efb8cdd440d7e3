"""The durable outbox: bounded by bytes, evicting by priority then age, surviving restarts.

Real SQLite files; the drainer is driven with a plain function as its publisher (the MQTT
link is the boundary here; the e2e outage test runs the real link and broker).
"""

from __future__ import annotations

import threading
import time

from agent.outbox import Outbox, OutboxDrainer, Pending


def test_budget_holds_and_telemetry_goes_before_events(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", budget_bytes=1024 * 1024)
    payload = b"x" * 1000
    for seq in range(1, 3001):
        channel = "events" if seq % 10 == 1 else "telemetry"
        outbox.put(seq, channel, payload)
        assert outbox.stats().bytes <= 1024 * 1024
    stats = outbox.stats()
    assert stats.dropped["telemetry"] > 0 and "events" not in stats.dropped
    kept = outbox.after(0, 10_000)
    assert sum(1 for p in kept if p.channel == "events") == 300, "every event survives"
    kept_telemetry = [p.seq for p in kept if p.channel == "telemetry"]
    assert kept_telemetry == sorted(kept_telemetry)
    assert min(kept_telemetry) > 1000, "the oldest telemetry went first"
    outbox.close()

    reopened = Outbox(tmp_path / "outbox.db", budget_bytes=1024 * 1024)
    assert reopened.stats() == stats, "depth, bytes and drop counts survive a restart"
    reopened.close()


def test_events_are_dropped_only_when_nothing_else_is_left(tmp_path):
    outbox = Outbox(tmp_path / "o.db", budget_bytes=5000)
    for seq in range(1, 11):
        outbox.put(seq, "events", b"e" * 1000)
    assert outbox.stats().dropped == {"events": 5}
    assert [p.seq for p in outbox.after(0, 100)] == [6, 7, 8, 9, 10]


def test_the_same_seq_twice_is_stored_and_counted_once(tmp_path):
    outbox = Outbox(tmp_path / "o.db", budget_bytes=1 << 20)
    outbox.put(5, "events", b"e" * 10)
    outbox.put(5, "events", b"e" * 10)
    assert (outbox.stats().depth, outbox.stats().bytes) == (1, 10)


def test_expired_messages_are_not_sent(tmp_path):
    outbox = Outbox(tmp_path / "o.db", budget_bytes=1 << 20)
    outbox.put(1, "telemetry", b"old", expiry_s=0.01)
    outbox.put(2, "telemetry", b"new", expiry_s=3600)
    time.sleep(0.05)
    sent: list[tuple[int, float | None]] = []
    drainer = OutboxDrainer(outbox, _recorder(sent), lambda: True)
    drainer.start()
    try:
        _wait(lambda: len(sent) == 1)
    finally:
        drainer.stop()
    assert sent[0][0] == 2 and 3500 < sent[0][1] <= 3600
    assert outbox.stats().dropped == {"expired": 1}


def test_rows_leave_only_on_puback_and_in_seq_order(tmp_path):
    outbox = Outbox(tmp_path / "o.db", budget_bytes=1 << 20)
    for seq in range(1, 101):
        outbox.put(seq, "telemetry", b"t")
    sent: list[tuple[int, float | None]] = []
    drainer = OutboxDrainer(outbox, _recorder(sent), lambda: True, rate=10_000, window=30)
    drainer.start()
    try:
        _wait(lambda: len(sent) == 30)
        time.sleep(0.1)
        assert len(sent) == 30, "no more than the window is ever unacknowledged"
        assert outbox.stats().depth == 100
        for mid in range(1, 101):
            drainer.acknowledged(mid)
            _wait(lambda mid=mid: len(sent) >= min(mid + 30, 100))
        _wait(lambda: outbox.stats().depth == 0)
    finally:
        drainer.stop()
    assert [seq for seq, _ in sent] == list(range(1, 101))


def test_an_ack_racing_ahead_of_publish_is_not_lost(tmp_path):
    outbox = Outbox(tmp_path / "o.db", budget_bytes=1 << 20)
    outbox.put(1, "events", b"e")
    drainer: OutboxDrainer

    def publish_and_ack_at_once(pending: Pending, expiry: float | None) -> int:
        drainer.acknowledged(7)  # the network thread was faster than publish() returning
        return 7

    drainer = OutboxDrainer(outbox, publish_and_ack_at_once, lambda: True)
    drainer.start()
    try:
        _wait(lambda: outbox.stats().depth == 0)
    finally:
        drainer.stop()


def _recorder(sent: list) -> callable:
    lock = threading.Lock()

    def publish(pending: Pending, expiry: float | None) -> int:
        with lock:
            sent.append((pending.seq, expiry))
            return len(sent)  # mids 1, 2, 3 ... in publish order

    return publish


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
