"""Bundle downloads on bad links, end to end: a real fleet, broker and enrolled agents,
each agent reaching the fleet's HTTP repository through a fault-injecting TCP proxy
(``tests.fixtures.fault_proxy``).

* A link reset (RST) every 100 KB: a 3 MB bundle completes by resuming, in one attempt
  (no ``failed`` event), with at most 1.2x its size through the link.
* ``--max-download-kbps 2000``: the agent takes the bundle at its cap, within 10 % (the
  rate from the bytes through the proxy and from the agent's progress events).

Both devices download at once: the test takes as long as the slower one.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from fleet.bundle_build import build_bundle
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.waiting import wait_until

CAP_KBPS = 2000


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: the repository's HTTP path is the same over either database."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _at(event: dict) -> float:
    return datetime.fromisoformat(event["sent_at"]).timestamp()


def _events(fleet_server, device_id: str, names: set[str]) -> list[dict]:
    return [e for e in fleet_server.events(device_id) if e["event"] in names]


@pytest.mark.timeout(300)
def test_a_3_mb_bundle_completes_through_resets_and_a_capped_agent_keeps_its_rate(
    tmp_path, fleet_server, mosquitto, agents, fault_proxy
):
    model = tmp_path / "big" / "model.onnx"
    model.parent.mkdir()
    build_mlp_onnx(model, hidden=95_000)  # ~3 MB of weights
    built = build_bundle(model, name="detector", version=1, out_dir=tmp_path / "bundles")
    assert 3_000_000 <= built.size < 3_300_000, built.size
    published = fleet_server.cli("bundle", "publish", str(built.path))
    assert published.returncode == 0, published.stderr

    fleet_port = int(fleet_server.url.rsplit(":", 1)[1])
    resetting, clean = fault_proxy(fleet_port), fault_proxy(fleet_port)
    links = {"edge-reset": resetting, "edge-capped": clean}
    for device_id, proxy in links.items():
        url = f"http://127.0.0.1:{proxy.port}"
        assert "enrolled with" in agents.enroll(device_id, url)
        extra = ("--fleet", url)
        if device_id == "edge-capped":
            extra += ("--max-download-kbps", str(CAP_KBPS))
        agents.start(device_id, mosquitto, extra_args=extra)
    for device_id in links:
        wait_until(lambda d=device_id: fleet_server.device(d), timeout=20,
                   what=f"{device_id} registered")
    resetting.reset_after(100_000, direction="down")
    before = {d: p.bytes_down for d, p in links.items()}

    for device_id in links:
        deployed = fleet_server.cli("deploy", "detector", "--version", "1",
                                    "--device", device_id)
        assert deployed.returncode == 0, deployed.stderr
    for device_id in links:
        wait_until(lambda d=device_id: _events(fleet_server, d, {"healthy", "failed"}),
                   timeout=120, what=f"{device_id}'s install to end")

    # Reset every 100 KB: done by resume, no failed event, few bytes sent twice.
    events = fleet_server.events("edge-reset")
    assert [e["event"] for e in events if e["event"] in ("failed", "healthy")] == ["healthy"]
    sent = resetting.bytes_down - before["edge-reset"]
    assert resetting.resets >= 25, resetting.resets
    assert sent <= 1.2 * built.size, f"{sent / built.size:.2f}x the bundle's bytes"
    took = _at(next(e for e in events if e["event"] == "verified")) - _at(
        next(e for e in events if e["event"] == "downloading"))

    # Capped: the whole download (first event to verified, the refresh included) at most
    # 10 % over the cap, and the middle of it (between progress events) within 10 %.
    events = fleet_server.events("edge-capped")
    assert [e["event"] for e in events if e["event"] in ("failed", "healthy")] == ["healthy"]
    downloading = [e for e in events if e["event"] == "downloading"]
    verified = next(e for e in events if e["event"] == "verified")
    overall = (clean.bytes_down - before["edge-capped"]) * 8 / 1000 / (
        _at(verified) - _at(downloading[0]))
    assert overall <= CAP_KBPS * 1.1, f"{overall:.0f} kbps, cap {CAP_KBPS}"
    progress = [e for e in downloading if "received" in e["detail"]]
    assert len(progress) >= 2, progress  # every 5 s of a ~12 s download
    first, last = progress[0], progress[-1]
    middle = (last["detail"]["received"] - first["detail"]["received"]) * 8 / 1000 / (
        _at(last) - _at(first))
    assert CAP_KBPS * 0.9 <= middle <= CAP_KBPS * 1.1, f"{middle:.0f} kbps, cap {CAP_KBPS}"
    assert all(e["detail"]["total"] == built.size for e in progress)
    print(f"reset every 100 KB: {sent / built.size:.3f}x, {resetting.resets} resets, "
          f"{took:.1f} s; "
          f"capped: overall {overall:.0f} kbps, middle {middle:.0f} kbps")
