"""A bundle server that drips or stalls cannot hold the device: deadline, floor, cancel.

Real parts: the fleet's signed repository on disk, served by a real local HTTP server that
is slow on purpose (``tests.fixtures.slow_http``), the device's python-tuf client and
installer. Limits are configured small so each test takes seconds; every wait is on a
condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from agent.cancel import Cancel
from agent.contract import BundleRef
from agent.trust.download import DownloadLimits, DownloadMeter
from tests.fixtures.slow_http import Drip, SlowRepoServer, Stall
from tests.fixtures.trust import make_device_side
from tests.fixtures.waiting import wait_until

V1 = BundleRef(name="detector", version=1)


@pytest.fixture
def slow_repo(repo_server) -> Iterator[SlowRepoServer]:
    """The same signed repository as ``repo_server``, served by a server that can be slow."""
    server = SlowRepoServer(repo_server.repository.data_dir / "repo").start()
    try:
        yield server
    finally:
        server.close()


def _install_timed(device) -> float:
    started = time.monotonic()
    assert device.installer.install(V1, None) is None, "nothing may be installed"
    return time.monotonic() - started


def test_slow_drip_server_ends_in_download_failed_too_slow(
    repo_server, slow_repo, make_bundle, tmp_path
):
    built = make_bundle(version=1)
    repo_server.publish(built)
    slow_repo.modes["detector-1.bundle"] = Drip(chunk=10, every=0.05)  # ~200 B/s
    limits = DownloadLimits(deadline_s=30, floor_bps=2000, window_s=1)
    device = make_device_side(tmp_path / "dev", slow_repo.url, limits=limits)

    elapsed = _install_timed(device)

    failure = device.failures()[-1]
    assert failure["reason"] == "download_failed", failure
    assert "too slow: " in failure["detail"] and "floor 2000 B/s" in failure["detail"], failure
    assert elapsed < limits.deadline_for(built.size), elapsed
    assert len(slow_repo.target_requests()) == 1, "a too-slow download is not retried at once"
    assert device.installer.slots.active() is None


def test_stalled_server_ends_in_download_failed_at_the_deadline(
    repo_server, slow_repo, make_bundle, tmp_path
):
    """Floor off: only the overall deadline can end a download that stops mid-way."""
    built = make_bundle(version=1)
    repo_server.publish(built)
    slow_repo.modes["detector-1.bundle"] = Stall(after=1000)
    limits = DownloadLimits(deadline_s=2, floor_bps=0, window_s=1)
    device = make_device_side(tmp_path / "dev", slow_repo.url, limits=limits)

    elapsed = _install_timed(device)

    failure = device.failures()[-1]
    assert failure["reason"] == "download_failed", failure
    assert "deadline exceeded" in failure["detail"], failure
    assert limits.deadline_s <= elapsed < limits.deadline_s + 10, elapsed
    assert (device.state_dir / "downloads").is_dir()
    parts = list((device.state_dir / "downloads").glob("*.part"))
    assert [p.stat().st_size for p in parts] == [1000], "kept for a resume"


def test_stalled_server_is_too_slow_under_the_floor(repo_server, slow_repo, make_bundle, tmp_path):
    repo_server.publish(make_bundle(version=1))
    slow_repo.modes["detector-1.bundle"] = Stall(after=1000)
    limits = DownloadLimits(deadline_s=60, floor_bps=100, window_s=1)
    device = make_device_side(tmp_path / "dev", slow_repo.url, limits=limits)

    elapsed = _install_timed(device)

    failure = device.failures()[-1]
    assert failure["reason"] == "download_failed"
    assert "too slow: 0 B/s over the last 1 s, floor 100 B/s" in failure["detail"], failure
    assert elapsed < limits.deadline_s


def test_a_stuck_download_is_cancelled_at_once(repo_server, slow_repo, make_bundle, tmp_path):
    """Limits that would wait for minutes: only the cancel can end this one."""
    repo_server.publish(make_bundle(version=1))
    slow_repo.modes["detector-1.bundle"] = Stall(after=1000)
    limits = DownloadLimits(deadline_s=600, floor_bps=0, window_s=60)
    device = make_device_side(tmp_path / "dev", slow_repo.url, limits=limits)
    cancel = Cancel()
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(device.installer.install(V1, None,
                                                                                     cancel)))
    worker.start()
    wait_until(lambda: slow_repo.target_requests(), timeout=20, what="the download to start")
    wait_until(lambda: any((device.state_dir / "downloads").glob("*.part")), timeout=10,
               what="the first bytes on disk")

    started = time.monotonic()
    cancel.cancel("superseded by generation 2")
    worker.join(timeout=10)

    assert not worker.is_alive(), "the cancel did not end the download"
    assert time.monotonic() - started < 5
    assert result == [None]
    names = [name for name, _ in device.events]
    assert names == ["downloading", "cancelled"], device.events
    assert device.events[-1][1]["reason"] == "superseded by generation 2"
    assert device.failures() == []


# ------------------------------------------------------------- the meter, without IO


def test_meter_says_nothing_before_a_whole_window_has_passed():
    meter = DownloadMeter(DownloadLimits(deadline_s=100, floor_bps=1000, window_s=10), 10**6, 0)
    assert meter.observe(9.9, 0) is None
    assert meter.observe(10.0, 0) == "too slow: 0 B/s over the last 10 s, floor 1000 B/s"


def test_meter_judges_the_last_window_only():
    """A fast start does not buy a stall later; a slow start is forgotten once fast."""
    meter = DownloadMeter(DownloadLimits(deadline_s=1000, floor_bps=1000, window_s=10), 10**7, 0)
    received = 0
    for second in range(1, 31):  # 30 s at 5000 B/s
        received += 5000
        assert meter.observe(second, received) is None
    for second in range(31, 39):  # then nothing: the average over 10 s falls to 1000 B/s
        assert meter.observe(second, received) is None, second
    assert meter.observe(39, received) == "too slow: 500 B/s over the last 10 s, floor 1000 B/s"

    meter = DownloadMeter(DownloadLimits(deadline_s=1000, floor_bps=1000, window_s=10), 10**7, 0)
    received = 0
    for second in range(1, 10):  # 9 s of nothing, within the first window: not judged yet
        assert meter.observe(second, received) is None
    for second in range(10, 30):  # then fast: judged on the last 10 s only
        received += 50_000
        assert meter.observe(second, received) is None, second


def test_deadline_scales_with_the_signed_length():
    limits = DownloadLimits(deadline_s=300, floor_bps=1024, window_s=60)
    assert limits.deadline_for(0) == 300
    assert limits.deadline_for(1024 * 600) == 900
    assert DownloadLimits(deadline_s=5, floor_bps=0).deadline_for(10**9) == 5
    meter = DownloadMeter(DownloadLimits(deadline_s=5, floor_bps=0, window_s=1), 10, 100.0)
    assert meter.observe(104.9, 3) is None
    assert meter.observe(105.0, 3) == "deadline exceeded: 5 s, allowed 5 s for 10 bytes " \
                                      "(3 received)"


@pytest.mark.parametrize(
    "kwargs", [{"deadline_s": 0}, {"floor_bps": -1}, {"window_s": 0}],
    ids=["deadline", "floor", "window"],
)
def test_nonsense_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match="download"):
        DownloadLimits(**kwargs)


def test_dripped_metadata_ends_the_refresh_too(repo_server, slow_repo, make_bundle, tmp_path):
    """The same server drips timestamp.json: TUF's refresh is bounded like a bundle."""
    repo_server.publish(make_bundle(version=1))
    limits = DownloadLimits(deadline_s=30, floor_bps=2000, window_s=1)
    device = make_device_side(tmp_path / "dev", slow_repo.url, limits=limits)
    slow_repo.modes["timestamp.json"] = Drip(chunk=1, every=0.05)  # ~20 B/s

    elapsed = _install_timed(device)

    failure = device.failures()[-1]
    assert failure["reason"] == "untrusted_metadata", failure
    assert "SlowRetrievalError" in failure["detail"], failure
    assert "too slow: " in failure["detail"], failure
    assert elapsed < limits.deadline_s
    assert slow_repo.target_requests() == [], "no bundle without fresh metadata"
