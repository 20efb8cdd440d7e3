"""``edge-agent doctor``: a healthy install passes; each broken part is named with a fix.

Real parts: the fleet's TUF repository served over HTTP (``repo_server``), a private
Mosquitto with the production account rules, the installed ``edge-agent`` command, and a
real ``edge-agent run`` for the checks that must ask the running agent instead of taking
over its broker session. The device's enrollment is made as enrollment leaves it: the
fleet's root pinned in ``tuf/root.json``, ``identity.json`` with a broker account.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from agent.doctor import DoctorInput, diagnose
from agent.identity import Identity
from agent.trust.client import enroll
from fleet.local_broker import free_port
from fleet.trust.repository import FleetRepository
from tests.fixtures.processes import console_script
from tests.fixtures.waiting import wait_until

DEVICE = "cam-doc"


def _enrolled(state_dir: Path, fleet_url: str, broker, password: str | None = None) -> Path:
    """A state directory as enrollment with a code leaves it (root pinned, identity)."""
    enroll(fleet_url, state_dir / "tuf")
    broker.url_for(DEVICE)  # makes the device's account
    Identity(device_id=DEVICE, fleet_url=fleet_url, broker=f"mqtt://127.0.0.1:{broker.port}",
             username=DEVICE, password=password or broker.passwords[DEVICE]).save(state_dir)
    state_dir.chmod(0o700)
    return state_dir


def _doctor(state_dir: Path, listen: str, *extra: str) -> tuple[int, dict, str]:
    config = state_dir.parent / "agent.toml"
    config.write_text(f'[agent]\nlisten = "{listen}"\n')
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("EDGE_AGENT_")}
    done = subprocess.run(
        [*console_script("edge-agent"), "--config", str(config), "doctor", "--state-dir",
         str(state_dir), "--timeout", "10", *extra],
        capture_output=True, text=True, timeout=120, env=env)
    report = json.loads(done.stdout) if "--json" in extra else {}
    return done.returncode, report, done.stdout + done.stderr


def _checks(report: dict) -> dict[str, dict]:
    return {check["name"]: check for check in report["checks"]}


def test_a_healthy_enrolled_device_passes_every_check(tmp_path, repo_server, mosquitto):
    state_dir = _enrolled(tmp_path / "state", repo_server.url, mosquitto)
    listen = f"127.0.0.1:{free_port()}"
    code, report, output = _doctor(state_dir, listen, "--json")
    assert code == 0, output
    checks = _checks(report)
    assert {name: check["status"] for name, check in checks.items()} == {
        "config": "ok", "state dir": "ok", "enrolled": "ok", "root pin": "ok", "trust": "ok",
        "broker": "ok", "slots": "ok", "onnxruntime": "ok", "tflite": "ok", "endpoint": "ok",
    }, output
    assert f"device {DEVICE} of {repo_server.url}" in checks["enrolled"]["detail"]
    assert "the pinned root leads to" in checks["trust"]["detail"]
    assert f"accepted {DEVICE} as edgefleet-agent-{DEVICE}" in checks["broker"]["detail"]
    assert f"{listen} is free" in checks["endpoint"]["detail"]
    # The doctor wrote nothing into the agent's state: its refresh ran on a copy.
    assert sorted(p.name for p in (state_dir / "tuf").iterdir()) == ["root.json"]
    assert not (state_dir / "downloads").exists()
    code, _, text = _doctor(state_dir, listen)
    assert code == 0
    assert text.splitlines()[-1] == "10 checks: all passed"
    assert all(line.startswith("ok ") for line in text.splitlines()[:-1]), text


def test_with_the_agent_running_the_doctor_asks_it_and_leaves_its_connection_alone(
        tmp_path, repo_server, mosquitto, agents):
    state_dir = _enrolled(agents.state_dir(DEVICE), repo_server.url, mosquitto)
    agent = agents.start(DEVICE, mosquitto.url_for(DEVICE), interval=0.5,
                         extra_args=("--fleet", repo_server.url))
    wait_until(lambda: "connected to" in agent.log(), timeout=60,
               what=f"the agent to connect; log:\n{agent.log()}")
    listen = agent.endpoint.removeprefix("http://")
    wait_until(lambda: (state_dir / "agent.sock").exists(), timeout=30, what="agent.sock")
    code, report, output = _doctor(state_dir, listen, "--json")
    assert code == 0, output
    checks = _checks(report)
    pid = agent.process.pid
    assert checks["broker"]["detail"] == (
        f"the running agent (pid {pid}) is connected to mqtt://{DEVICE}@127.0.0.1:"
        f"{mosquitto.port}")
    assert checks["endpoint"]["detail"] == f"{listen} held by the running agent (pid {pid})"
    assert "lost the broker" not in agent.log()  # no probe took its client id


def test_a_wrong_broker_password_is_named(tmp_path, repo_server, mosquitto):
    state_dir = _enrolled(tmp_path / "state", repo_server.url, mosquitto, password="wrong")
    code, report, output = _doctor(state_dir, f"127.0.0.1:{free_port()}", "--json")
    assert code == 1, output
    broker = _checks(report)["broker"]
    assert broker["status"] == "FAIL"
    assert broker["detail"].startswith(
        f"mqtt://{DEVICE}@127.0.0.1:{mosquitto.port} refused the device's credentials (user "
        f"{DEVICE}, client id edgefleet-agent-{DEVICE}): Not authorized")
    assert "enroll again with a new code" in broker["fix"]
    assert {c["name"] for c in report["checks"] if c["status"] == "FAIL"} == {"broker"}


def test_another_fleets_root_is_named(tmp_path, repo_server, mosquitto):
    state_dir = _enrolled(tmp_path / "state", repo_server.url, mosquitto)
    other = FleetRepository(tmp_path / "other-fleet")
    other.init()
    shutil.copyfile(other.metadata_dir / "root.json", state_dir / "tuf" / "root.json")
    code, report, output = _doctor(state_dir, f"127.0.0.1:{free_port()}", "--json")
    assert code == 1, output
    checks = _checks(report)
    assert checks["root pin"]["status"] == "ok"  # a valid root, just not this fleet's
    trust = checks["trust"]
    assert trust["status"] == "FAIL"
    assert trust["detail"].startswith(f"root pin wrong / fleet unreachable: {repo_server.url}:")
    assert "UnsignedMetadataError" in trust["detail"]
    assert {c["name"] for c in report["checks"] if c["status"] == "FAIL"} == {"trust"}


def test_an_unreachable_fleet_and_broker_are_named(tmp_path, repo_server, mosquitto):
    state_dir = _enrolled(tmp_path / "state", repo_server.url, mosquitto)
    dead = free_port()
    Identity(device_id=DEVICE, fleet_url=f"http://127.0.0.1:{dead}",
             broker=f"mqtt://127.0.0.1:{dead}", username=DEVICE, password="x").save(state_dir)
    report = diagnose(DoctorInput(state_dir, listen="off", timeout=5))
    trust, broker = report.get("trust"), report.get("broker")
    assert trust.status == broker.status == "FAIL"
    assert "root pin wrong / fleet unreachable" in trust.detail
    assert "Connection refused" in trust.detail or "connection refused" in trust.detail.lower()
    assert f"cannot reach mqtt://{DEVICE}@127.0.0.1:{dead}: connection refused" in broker.detail


def test_a_state_dir_others_can_read_is_refused_with_the_fix(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    report = diagnose(DoctorInput(state_dir, listen="off"))
    check = report.get("state dir")
    assert check.status == "FAIL" and "mode 0755" in check.detail
    assert check.fix == f"chmod 700 {state_dir}"
    assert report.get("enrolled").status == "skip"
    assert not report.ok


def test_a_device_never_enrolled_is_told_how(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    report = diagnose(DoctorInput(state_dir, listen="off"))
    enrolled = report.get("enrolled")
    assert enrolled.status == "FAIL" and "not enrolled" in enrolled.detail
    assert "edge-agent enroll --fleet URL --code CODE" in enrolled.fix
    # One cause, said once: what depends on enrollment is skipped, not failed again.
    assert [c.name for c in report.checks if c.status == "FAIL"] == ["enrolled"]
    assert report.get("root pin").status == report.get("broker").status == "skip"


def test_an_identity_file_others_can_read_is_refused(tmp_path, repo_server, mosquitto):
    state_dir = _enrolled(tmp_path / "state", repo_server.url, mosquitto)
    (state_dir / "identity.json").chmod(0o644)
    check = diagnose(DoctorInput(state_dir, listen="off")).get("enrolled")
    assert check.status == "FAIL" and "identity.json: mode 0644" in check.detail


def test_an_unfinished_install_in_the_active_slot_is_named(tmp_path):
    state_dir = tmp_path / "state"
    (state_dir / "slots" / "a").mkdir(parents=True)
    state_dir.chmod(0o700)
    (state_dir / "current").symlink_to("slots/a")
    check = diagnose(DoctorInput(state_dir, listen="off")).get("slots")
    assert check.status == "FAIL"
    assert "active slot a" in check.detail and "installation never completed" in check.detail


def test_an_endpoint_port_taken_by_another_process_is_named(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        check = diagnose(DoctorInput(tmp_path, listen=f"127.0.0.1:{port}")).get("endpoint")
    assert check.status == "FAIL"
    assert f"127.0.0.1:{port} is taken by pid {os.getpid()}" in check.detail


def test_a_bad_config_file_is_a_failed_check_not_a_usage_error(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nlisen = \"x\"\n")
    done = subprocess.run(
        [*console_script("edge-agent"), "--config", str(config), "doctor", "--state-dir",
         str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("FAIL  config:")
    assert "unknown setting 'lisen'" in first


@pytest.fixture(autouse=True)
def _no_machine_config(monkeypatch):
    """The in-process checks read run's settings from the test, never /etc/edgefleet."""
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "none")
