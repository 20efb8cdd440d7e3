"""A new device's first hour, across real processes: enrollment names the broker, an agent
that cannot work as a fleet's device says so, and ``edge-agent status`` tells what it is.

Real ``edge-fleet serve`` (its local broker, as the quickstart runs it, or the production
Mosquitto of the test fixtures), real ``edge-agent`` processes, real onnxruntime.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from fleet.api import create_app
from fleet.api.routes.device_config import DeviceBroker
from fleet.db import init_db, make_engine
from fleet.local_broker import free_port
from tests.fixtures.processes import console_script, spawn, start_fleet
from tests.fixtures.waiting import wait_until


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_script("edge-agent"), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def _run_agent(tmp_path: Path, device_id: str, state_dir: Path, *extra: str):
    command = [*console_script("edge-agent"), "run", "--device-id", device_id,
               "--state-dir", str(state_dir), "--interval", "1", "--keepalive", "5",
               "--listen", f"127.0.0.1:{free_port()}", *extra]
    return spawn(command, tmp_path / f"{device_id}.log", {"EDGE_AGENT_BROKER": ""})


def test_enrollment_gives_the_broker_and_an_account_so_run_needs_only_its_state_dir(tmp_path):
    fleet = start_fleet(tmp_path, None, f"sqlite:///{tmp_path / 'fleet.db'}")  # local broker
    agent = stray = None
    try:
        port = int((fleet.data_dir / "broker-port").read_text())
        state_dir = tmp_path / "cam-01"
        enrolled = _agent("enroll", "--fleet", fleet.url, "--code", fleet.add_device("cam-01"),
                          "--state-dir", str(state_dir))
        assert enrolled.returncode == 0, enrolled.stderr
        assert (f"enrolled cam-01 with {fleet.url}: root keys checked against the code; "
                f"broker mqtt://127.0.0.1:{port} as cam-01") in enrolled.stdout

        agent = spawn([*console_script("edge-agent"), "run", "--state-dir", str(state_dir),
                       "--interval", "1", "--listen", f"127.0.0.1:{free_port()}"],
                      tmp_path / "cam-01.log", {"EDGE_AGENT_BROKER": ""})
        wait_until(lambda: (fleet.device("cam-01") or {}).get("online"), timeout=30,
                   what="cam-01 online through the broker it was given")
        assert (f"device cam-01, broker mqtt://cam-01@127.0.0.1:{port} (given by {fleet.url} "
                "at enrollment as cam-01)") in agent.log()
        assert "NOT ENROLLED" not in agent.log()

        # An explicit --broker wins, and a broker that is not there is named, with why
        # and when the agent tries again, within seconds rather than never.
        closed = free_port()
        stray_dir = tmp_path / "cam-02"
        assert _agent("enroll", "--fleet", fleet.url, "--code", fleet.add_device("cam-02"),
                      "--state-dir", str(stray_dir)).returncode == 0
        stray = _run_agent(tmp_path, "cam-02", stray_dir, "--broker",
                           f"mqtt://127.0.0.1:{closed}")
        line = wait_until(
            lambda: re.search(r"WARNING agent\.mqtt: cannot reach the broker (.*)", stray.log()),
            timeout=30, what="the unreachable broker named").group(1)
        assert line.startswith(f"mqtt://127.0.0.1:{closed}: connection refused")
        assert re.search(r"retrying in \d+\.\d s \(at \d\d:\d\d:\d\d\)$", line), line
    finally:
        for process in (agent, stray):
            if process is not None:
                process.terminate()
        fleet.terminate()


def test_the_device_config_names_the_broker_devices_can_reach(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'f.db'}")
    init_db(engine)

    def told(broker: DeviceBroker | None, host: str = "fleet.lan:8000") -> dict:
        with TestClient(create_app(engine, device_broker=broker)) as client:
            answer = client.get("/api/v1/device-config", headers={"Host": host})
        assert answer.status_code == 200, answer.text
        return answer.json()

    local = DeviceBroker.from_urls("mqtt://127.0.0.1:41883", None)
    assert told(local) == {"broker": "mqtt://fleet.lan:41883"}  # the host they reached
    assert told(local, host="127.0.0.1:8000") == {"broker": "mqtt://127.0.0.1:41883"}
    remote = DeviceBroker.from_urls("mqtts://fleet-w1:secret@broker.lan:8883", None)
    assert told(remote) == {"broker": "mqtts://broker.lan:8883"}  # never its credentials
    fixed = DeviceBroker.from_urls("mqtt://127.0.0.1:1", "mqtt://203.0.113.7:1883")
    assert told(fixed) == {"broker": "mqtt://203.0.113.7:1883"}
    assert told(None) == {"broker": None}
    try:
        DeviceBroker.from_urls("mqtt://127.0.0.1:1", "mqtt://u:p@broker.lan:1883")
    except ValueError as exc:
        assert "must not carry credentials" in str(exc)
    else:
        raise AssertionError("a device broker URL with credentials was accepted")


def test_an_agent_without_enrollment_says_so_and_warns_when_no_fleet_speaks(
    tmp_path, mosquitto, agents
):
    agent = agents.start("lonely", mosquitto, extra_args=("--fleet-silence", "2"))
    state_dir = agents.state_dir("lonely")
    wait_until(lambda: "NOT ENROLLED" in agent.log(), timeout=30, what="the start-up warning")
    assert re.search(
        r"WARNING agent\.daemon: NOT ENROLLED: .* refuses every deployment .* "
        rf"edge-agent enroll --fleet http://FLEET:8000 --state-dir {re.escape(str(state_dir))}",
        agent.log())
    silence = wait_until(
        lambda: re.search(r"WARNING agent\.daemon: connected for \d+ s and no fleet has sent "
                          r"this device anything, and it is not enrolled.*", agent.log()),
        timeout=60, what="the silence warning")
    assert "edge-agent enroll --fleet URL" in silence.group(0)
    assert agent.log().count("no fleet has sent this device anything") == 1  # once a run


def test_status_tells_fleet_device_trust_model_desired_and_outbox_with_or_without_agent(
    fleet_server, mosquitto, agents, make_bundle
):
    bundle = make_bundle(version=1)
    assert fleet_server.cli("bundle", "publish", str(bundle.path)).returncode == 0
    agents.enroll("edge-s", fleet_server.url)
    state_dir = str(agents.state_dir("edge-s"))
    agent = agents.start("edge-s", mosquitto)
    wait_until(lambda: fleet_server.device("edge-s"), timeout=30, what="edge-s registered")
    deployed = fleet_server.cli("deploy", "detector", "--version", "1", "--device", "edge-s")
    assert deployed.returncode == 0, deployed.stderr
    wait_until(lambda: (fleet_server.device("edge-s") or {}).get("active_model"),
               timeout=30, what="v1 active")

    running = _agent("status", "--state-dir", state_dir)
    assert running.returncode == 0, running.stderr
    text = running.stdout
    assert re.search(rf"agent: +running \(pid {agent.process.pid}\), connected to mqtt://", text)
    for expected in (
        "device id:    edge-s",
        f"fleet:        {fleet_server.url}",
        "trust:        root v1 (keys ",
        "active model: detector v1 (slot a)",
        "desired:      generation 1: detector v1",
    ):
        assert expected in text, (expected, text)
    assert re.search(r"outbox: +\d+ message\(s\) waiting", text)

    as_json = json.loads(_agent("status", "--state-dir", state_dir, "--json").stdout)
    assert as_json["daemon"]["serving"] == {"name": "detector", "version": 1}
    assert as_json["root"]["version"] == 1 and as_json["desired"]["generation"] == 1

    agent.terminate()
    stopped = _agent("status", "--state-dir", state_dir, "--log-level", "DEBUG")
    assert stopped.returncode == 0, stopped.stderr
    assert "agent:        not running" in stopped.stdout
    assert "active model: detector v1 (slot a)" in stopped.stdout
    # Status takes no lock: the agent starts again beside it at once.
    again = agents.start("edge-s", mosquitto)
    wait_until(lambda: "running (pid" in _agent("status", "--state-dir", state_dir).stdout,
               timeout=30, what="the restarted agent answering status")
    assert again.process.poll() is None
    assert httpx.get(f"{fleet_server.url}/api/v1/device-config", timeout=5).json()["broker"]
