"""ModelHost: requests in flight finish on the engine they started on, new ones go to the
new model at once, and a retired engine is closed exactly when its last request returns.

Real bundles unpacked into slots, real onnxruntime engines, real threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.contract import BundleManifest
from agent.health import open_checked_engine
from agent.installer import LoadedModel
from agent.serving import ModelHost, NoModelError
from tests.fixtures.models import build_mlp_onnx, mlp_reference


@pytest.fixture
def slots(make_bundle, tmp_path: Path) -> dict[int, tuple[Path, BundleManifest]]:
    """Version -> (slot directory, manifest); version 1 and 2 compute different functions."""
    unpacked = {}
    for version, seed in ((1, 0), (2, 1)):
        slot = tmp_path / f"slot-{version}"
        manifest = extract_bundle(make_bundle(version=version, seed=seed).path, slot, 1 << 26)
        unpacked[version] = (slot, manifest)
    return unpacked


def _load(slots, version: int) -> LoadedModel:
    slot, manifest = slots[version]
    return LoadedModel(str(version), manifest, open_checked_engine(slot, manifest))


def test_a_request_in_flight_keeps_its_engine_until_it_returns(slots):
    host = ModelHost()
    first = _load(slots, 1)
    host.swap(first)

    with host.lease() as leased:
        host.swap(_load(slots, 2))
        assert host.current is not None and host.current.manifest.version == 2
        assert not leased.engine.closed  # still answering the request that leased it
        assert leased.engine.infer(np.zeros((1, 4), np.float32))["y"].shape == (1, 3)
    assert first.engine.closed  # closed as the last request on it returned

    _, model = host.infer(np.zeros((1, 4), np.float32))
    assert model.manifest.version == 2
    host.close()
    assert model.engine.closed
    with pytest.raises(NoModelError):
        host.infer(np.zeros((1, 4), np.float32))


def test_an_idle_engine_is_closed_at_the_swap(slots):
    host = ModelHost()
    first = _load(slots, 1)
    host.swap(first)
    host.swap(_load(slots, 2))

    assert first.engine.closed
    host.close()


def test_a_swap_restarts_the_latency_percentiles_and_keeps_the_counters(slots):
    host = ModelHost()
    host.swap(_load(slots, 1))
    for _ in range(5):
        host.infer(np.zeros((1, 4), np.float32))
    before = host.stats.snapshot()
    assert before["inference_count"] == 5 and before["latency_ms_p95"] is not None
    host.swap(_load(slots, 2))
    after = host.stats.snapshot()
    assert after["inference_count"] == 5, "counters cover the process's life"
    assert after["latency_ms_p95"] is None, "no latency of the new model measured yet"
    host.infer(np.zeros((1, 4), np.float32))
    assert host.stats.snapshot()["latency_ms_p95"] is not None
    host.close()


def test_many_swaps_under_concurrent_load_fail_no_request_and_close_every_old_engine(
    slots, tmp_path: Path
):
    references = {
        version: mlp_reference(build_mlp_onnx(tmp_path / f"ref{seed}.onnx", seed=seed),
                               np.full((2, 4), 0.25, np.float32))
        for version, seed in ((1, 0), (2, 1))
    }
    host = ModelHost()
    host.swap(_load(slots, 1))
    stop = threading.Event()
    failures: list[str] = []
    answered = [0]

    def client() -> None:
        x = np.full((2, 4), 0.25, np.float32)
        while not stop.is_set():
            try:
                outputs, model = host.infer(x)
            except Exception as exc:  # any failure is what this test looks for
                failures.append(repr(exc))
                continue
            if not np.allclose(outputs["y"], references[model.manifest.version], atol=1e-5):
                failures.append(f"v{model.manifest.version} gave another model's answer")
            answered[0] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    retired: list[LoadedModel] = []
    try:
        for swap in range(40):
            retired.append(host.current)
            host.swap(_load(slots, 2 if swap % 2 == 0 else 1))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert failures == []
    assert answered[0] > 40
    assert all(model.engine.closed for model in retired)
    assert not host.current.engine.closed
    host.close()
