"""``edge-fleet quickstart`` as the README runs it, then "Ship a model" against its agent.

A real quickstart process (SQLite, its local broker, its own enrolled agent), a bundle
published and deployed with the CLI, and the agent serving the model: its answer equals a
direct onnxruntime run.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import numpy as np
import onnxruntime as ort

from fleet.local_broker import free_port
from tests.fixtures.processes import FleetServer, console_script, spawn
from tests.fixtures.waiting import wait_until


def _start_quickstart(tmp_path, agent_port: int) -> FleetServer:
    data_dir = tmp_path / "demo-fleet"
    port = free_port()
    env = {"EDGEFLEET_DATA_DIR": str(data_dir),
           # The quickstart's agent inherits the environment: a free endpoint port.
           "EDGE_AGENT_LISTEN": f"127.0.0.1:{agent_port}", "EDGE_AGENT_BROKER": ""}
    managed = spawn([*console_script("edge-fleet"), "quickstart", "--port", str(port)],
                    tmp_path / "quickstart.log", env)
    fleet = FleetServer(managed.process, managed.log_path, url=f"http://127.0.0.1:{port}",
                        data_dir=data_dir, env=env)

    def healthy() -> bool:
        if fleet.process.poll() is not None:
            raise AssertionError(f"edge-fleet quickstart exited:\n{fleet.log()}")
        try:
            return bool(httpx.get(f"{fleet.url}/healthz", timeout=1).json()["ingest_connected"])
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=60, what="the quickstart's fleet healthy")
    fleet.token = (data_dir / "admin-token").read_text().strip()
    return fleet


def test_the_quickstarts_agent_accepts_a_deployment_end_to_end(tmp_path, make_bundle):
    agent_port = free_port()
    fleet = _start_quickstart(tmp_path, agent_port)
    agent_log = fleet.data_dir / "agents" / "local-agent.log"
    try:
        wait_until(lambda: (fleet.device("local-agent") or {}).get("online"), timeout=60,
                   what="the quickstart's agent online")
        assert "enrolled local-agent with" in agent_log.read_text()
        bundle = make_bundle(version=1)
        published = fleet.cli("bundle", "publish", str(bundle.path))
        assert published.returncode == 0, published.stderr
        deployed = fleet.cli("deploy", "detector", "--version", "1", "--device", "local-agent")
        assert deployed.returncode == 0, deployed.stderr

        wait_until(lambda: (fleet.device("local-agent") or {}).get("active_model")
                   == {"name": "detector", "version": 1},
                   timeout=60, what="detector v1 active on the quickstart's agent")
        events = [e["event"] for e in fleet.events("local-agent")]
        assert "desired_rejected" not in events and events[-1] == "healthy", events

        x = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
        answer = httpx.post(f"http://127.0.0.1:{agent_port}/v1/infer",
                            json={"inputs": x.tolist()}, timeout=10)
        assert answer.status_code == 200, answer.text
        served = np.array(answer.json()["outputs"]["y"], np.float32)
        model = tmp_path / "build" / "detector-1-0" / "model.onnx"  # what make_bundle built
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(served, session.run(["y"], {"x": x})[0], rtol=1e-6)

        log = agent_log.read_text()
        assert "NOT ENROLLED" not in log and "Traceback" not in log
        assert "(given by " in log  # it found the broker through its enrollment
    finally:
        fleet.terminate(timeout=30)
    assert "Traceback" not in fleet.log()
    status = json.loads(subprocess.run(
        [*console_script("edge-agent"), "status", "--json", "--state-dir",
         str(fleet.data_dir / "agents" / "local-agent")],
        capture_output=True, text=True, timeout=60).stdout)
    assert status["daemon"] is None, "the quickstart stops its agent with it"
    assert status["active"]["model"] == {"name": "detector", "version": 1}
