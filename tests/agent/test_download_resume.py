"""A download on a link that drops keeps every byte it got and goes on by resume; a rate
cap holds the agent's own download to its share of the link.

Real parts: the fleet's signed repository served by the fleet's app under uvicorn
(``tests.fixtures.trust``), the device's TUF client and installer. The one boundary bent is
:class:`~tests.fixtures.trust.NetworkFaults`, which cuts a response after N bytes (re-armed
here for each request: every connection is cut). The same through a TCP proxy with a
real agent process: ``tests/e2e/test_download_links.py``.
"""

from __future__ import annotations

import os
import time

import pytest

from agent.contract import BundleRef
from agent.errors import DownloadError
from agent.trust.download import DownloadLimits, TokenBucket, retry_pause
from fleet.bundle_build import build_bundle
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.trust import make_device_side

KB = 1000


def test_token_bucket_lets_through_its_rate_and_no_burst_at_the_start():
    bucket = TokenBucket(rate=100_000, now=0.0)
    now, taken = 0.0, 0
    while now < 10.0:
        taken += bucket.burst
        now += bucket.take(bucket.burst, now)
    assert 100_000 * 10 <= taken <= 100_000 * 10 + bucket.burst
    # Idle for a minute: at most one burst (a tenth of a second) may go through at once.
    assert bucket.take(bucket.burst, now + 60) == 0.0
    assert bucket.take(bucket.burst, now + 60) == pytest.approx(0.1)


def test_retry_pause_is_short_after_progress_and_doubles_without():
    assert retry_pause(0) == pytest.approx(0.2)
    assert [retry_pause(n) for n in (1, 2, 3)] == pytest.approx([0.4, 0.8, 1.6])
    assert retry_pause(20) == 10.0
    assert retry_pause(0, jitter=0.5) == pytest.approx(0.1)


def test_a_rate_cap_at_or_below_the_floor_or_negative_is_refused():
    with pytest.raises(ValueError, match=r"cap 8 kbps \(1000 B/s\) must be above the "
                                         r"download floor \(1024 B/s\)"):
        DownloadLimits(max_rate_bps=1000)
    with pytest.raises(ValueError, match=r"rate cap must be 0 \(off\) or more"):
        DownloadLimits(max_rate_bps=-1)
    assert DownloadLimits(max_rate_bps=1000, floor_bps=0).max_rate_bps == 1000


def _published_blob(repo_server, tmp_path, size: int, name: str = "blob-1.bin"):
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    repo_server.publish_raw(path, name)
    return path


def _cut_every_connection(faults, after: int) -> None:
    """Each request for a target is cut after ``after`` bytes (NetworkFaults cuts one)."""
    inner = faults.app

    async def rearm(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/repo/targets/"):
            faults.cut_after = after  # for the next request
        await inner(scope, receive, send)

    faults.app = rearm
    faults.cut_after = after


def test_a_link_cut_every_100_kb_completes_in_one_download_by_resume(
    repo_server, tmp_path
):
    blob = _published_blob(repo_server, tmp_path, 1000 * KB + 1)
    device = make_device_side(tmp_path / "dev", repo_server.url)
    client, faults = device.client, repo_server.faults
    client.refresh()
    info = client.target_info("blob-1.bin")

    _cut_every_connection(faults, 100 * KB)
    path = client.download(info)

    assert path.read_bytes() == blob.read_bytes()
    ranges = [r for _, r in faults.target_requests()]
    assert len(ranges) == 11, ranges
    starts = [0] + [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:]]
    assert starts == [100 * KB * i for i in range(len(starts))], (
        "each try resumes exactly where the cut left the file: no byte lost, none twice")


def test_a_link_that_gives_nothing_is_given_up_after_the_tries_in_a_row(
    repo_server, tmp_path
):
    _published_blob(repo_server, tmp_path, 300 * KB)
    device = make_device_side(tmp_path / "dev", repo_server.url)
    client, faults = device.client, repo_server.faults
    client.download_attempts = 3
    client.refresh()
    info = client.target_info("blob-1.bin")

    _cut_every_connection(faults, 0)  # no try gets a byte...
    faults.cut_after = 120 * KB  # ...but the first
    with pytest.raises(DownloadError, match=r"gave up at 120000/300000 bytes after 3 tries "
                                            r"in a row without progress \(4 in all\)"):
        client.download(info)
    parts = list((device.state_dir / "downloads").glob("*.part"))
    assert [p.stat().st_size for p in parts] == [120 * KB], "kept for the next attempt"


@pytest.fixture
def big_bundle(tmp_path, repo_server):
    """A real bundle of about 1.6 MB (an MLP with a wide hidden layer), published."""
    model = tmp_path / "big" / "model.onnx"
    model.parent.mkdir()
    build_mlp_onnx(model, hidden=50_000)
    built = build_bundle(model, name="detector", version=1, out_dir=tmp_path / "bundles")
    repo_server.publish(built)
    return built


def test_a_capped_download_holds_its_rate_and_reports_progress(
    repo_server, big_bundle, tmp_path
):
    cap_kbps = 4000
    limits = DownloadLimits(max_rate_bps=cap_kbps * 1000 / 8)
    device = make_device_side(tmp_path / "dev", repo_server.url, limits=limits)
    device.installer.progress_every_s = 0.5
    timed: list[tuple[float, dict]] = []
    emit = device.installer.emit
    device.installer.emit = lambda name, **detail: (
        timed.append((time.monotonic(), detail)) if name == "downloading" else None,
        emit(name, **detail))

    loaded = device.installer.install(BundleRef(name="detector", version=1), None)

    assert loaded is not None and device.failures() == []
    started = timed[0][0]
    finished = time.monotonic()
    progress = [(at, d["received"]) for at, d in timed if "received" in d]
    assert all(d["total"] == big_bundle.size for _, d in timed[1:])
    rate = big_bundle.size * 8 / 1000 / (finished - started)
    assert rate <= cap_kbps * 1.1, f"{rate:.0f} kbps over a cap of {cap_kbps}"
    # From the progress events: the middle of the download, without start-up costs.
    assert 4 <= len(progress) <= (finished - started) / 0.5 + 1, progress
    (t1, r1), (t2, r2) = progress[0], progress[-1]
    middle = (r2 - r1) * 8 / 1000 / (t2 - t1)
    assert cap_kbps * 0.9 <= middle <= cap_kbps * 1.1, f"{middle:.0f} kbps"


def test_max_download_kbps_comes_from_the_command_line_environment_or_config_file(
    monkeypatch, tmp_path
):
    import agent.config_file as config_file
    from agent.cli import _build_parser, _with_config

    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config_file, "DEFAULT_CONFIG", tmp_path / "none.toml")
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nmax_download_kbps = 500\n")

    def kbps(*argv: str) -> float:
        parser = _build_parser()  # after the environment is set: defaults read it
        args = _with_config(parser, list(argv), parser.parse_args(list(argv)))
        assert args is not None
        return args.max_download_kbps

    assert kbps("run") == 0.0
    assert kbps("--config", str(config), "run") == 500.0
    assert kbps("--config", str(config), "run", "--max-download-kbps", "800") == 800.0
    monkeypatch.setenv("EDGE_AGENT_MAX_DOWNLOAD_KBPS", "300")
    assert kbps("--config", str(config), "run") == 300.0
