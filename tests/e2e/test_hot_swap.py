"""Hot swap under load: a client calls the agent's local endpoint without pause while the
fleet updates the device and then rolls it back. Zero failed requests; the version in the
responses changes exactly once each way; every answer is the right model's answer.

Real fleet, broker, agent process, HTTP and onnxruntime.
"""

from __future__ import annotations

import itertools
import threading

import httpx
import numpy as np

from tests.fixtures.models import build_mlp_onnx, mlp_reference
from tests.fixtures.waiting import wait_until


def _serving(endpoint: str) -> bool:
    try:
        return httpx.get(f"{endpoint}/healthz", timeout=2).json()["model"]
    except httpx.HTTPError:  # not listening yet
        return False


def test_update_and_rollback_under_load_fail_no_request(
    fleet_server, mosquitto, agents, make_bundle, tmp_path
):
    for version, seed in ((1, 0), (2, 1)):
        bundle = make_bundle(version=version, seed=seed)
        assert fleet_server.cli("bundle", "publish", str(bundle.path)).returncode == 0
    expected = {
        version: mlp_reference(build_mlp_onnx(tmp_path / f"ref{seed}.onnx", seed=seed),
                               np.full((2, 4), 0.5, np.float32))
        for version, seed in ((1, 0), (2, 1))
    }
    agents.enroll("cam", fleet_server.url)
    agent = agents.start("cam", mosquitto)
    wait_until(lambda: fleet_server.device("cam"), timeout=15, what="cam registered")
    deployed = fleet_server.cli("deploy", "detector", "--version", "1", "--device", "cam")
    assert deployed.returncode == 0, deployed.stderr
    wait_until(lambda: _serving(agent.endpoint), timeout=20, what="v1 serving")

    results: list[tuple[int, int | None]] = []  # (HTTP status or -1, model version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=agent.endpoint, timeout=10) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/infer", json={"inputs": [[0.5] * 4] * 2})
                except httpx.HTTPError:
                    results.append((-1, None))
                    continue
                if response.status_code != 200:
                    results.append((response.status_code, None))
                    continue
                body = response.json()
                version = body["model"]["version"]
                ok = np.allclose(body["outputs"]["y"], expected[version], atol=1e-5)
                results.append((200 if ok else -2, version))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(results) > 20, timeout=10, what="traffic")
        assert fleet_server.cli("deploy", "detector", "--version", "2",
                                "--device", "cam").returncode == 0
        wait_until(lambda: results[-1][1] == 2, timeout=20, what="answers from v2")
        count = len(results)
        wait_until(lambda: len(results) > count + 20, timeout=10, what="more traffic on v2")
        assert fleet_server.cli("deploy", "detector", "--version", "1",
                                "--device", "cam").returncode == 0
        wait_until(lambda: results[-1][1] == 1, timeout=20, what="answers from v1 again")
        count = len(results)
        wait_until(lambda: len(results) > count + 20, timeout=10, what="more traffic on v1")
    finally:
        stop.set()
        thread.join(10)

    failures = [r for r in results if r[0] != 200]
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    runs = [version for version, _ in itertools.groupby(v for _, v in results)]
    assert runs == [1, 2, 1], runs
    assert len(results) > 60
