"""The update path across processes: real ``edge-fleet serve``, broker, ``edge-agent run``.

* A bundle server that stalls: the agent's ``--download-deadline`` ends the download and the
  fleet receives ``failed`` / ``download_failed``; a newer deployment cancels a download
  that hangs and is installed.
* ``edge-agent rollback`` with no agent running rolls back on disk; the agent reports it
  to the fleet as ``rolled_back`` when it starts, and refuses a second one.

Bundles come from the fleet's own repository directory, served by a real local HTTP
server that can stall (``tests.fixtures.slow_http``), given to the agent with ``--fleet``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.processes import console_script
from tests.fixtures.slow_http import SlowRepoServer, Stall
from tests.fixtures.waiting import wait_until

V1 = {"name": "detector", "version": 1}
V2 = {"name": "detector", "version": 2}
V3 = {"name": "detector", "version": 3}


@pytest.fixture
def published(fleet_server, make_bundle) -> None:
    for version in (1, 2, 3):
        bundle = make_bundle(version=version, seed=version)
        done = fleet_server.cli("bundle", "publish", str(bundle.path))
        assert done.returncode == 0, done.stderr


@pytest.fixture
def slow_fleet_repo(fleet_server) -> Iterator[SlowRepoServer]:
    """The fleet's repository, served by a server that stalls on request."""
    server = SlowRepoServer(fleet_server.data_dir / "repo").start()
    try:
        yield server
    finally:
        server.close()


def _deploy(fleet_server, version: int, device_id: str) -> None:
    done = fleet_server.cli("deploy", "detector", "--version", str(version),
                            "--device", device_id)
    assert done.returncode == 0, done.stderr


def _active(fleet_server, device_id: str) -> dict | None:
    device = fleet_server.device(device_id)
    return device["active_model"] if device else None


def _events(fleet_server, device_id: str, name: str) -> list[dict]:
    return [e["detail"] for e in fleet_server.events(device_id) if e["event"] == name]


def _rollback(agents, device_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*console_script("edge-agent"), "rollback", "--state-dir",
         str(agents.state_dir(device_id))],
        capture_output=True, text=True, timeout=120,
    )


def test_stalled_download_ends_at_the_configured_deadline(
    fleet_server, mosquitto, agents, published, slow_fleet_repo
):
    slow_fleet_repo.modes["detector-2.bundle"] = Stall(after=1000)
    agents.enroll("dev", fleet_server.url)
    agent = agents.start("dev", mosquitto, extra_args=(
        "--fleet", slow_fleet_repo.url, "--download-deadline", "3", "--download-floor", "0",
    ))
    wait_until(lambda: fleet_server.device("dev"), timeout=10, what="dev registered")

    _deploy(fleet_server, 2, "dev")
    wait_until(lambda: slow_fleet_repo.target_requests("detector-2.bundle"), timeout=20,
               what="the download to start")
    started = time.monotonic()
    failures = wait_until(lambda: _events(fleet_server, "dev", "failed"), timeout=30,
                          what="the download to fail")

    assert time.monotonic() - started < 3 + 15, "ended by the deadline, not by a read timeout"
    assert failures[0]["reason"] == "download_failed", failures
    assert "deadline exceeded" in failures[0]["detail"], failures
    assert _active(fleet_server, "dev") is None
    assert "Traceback" not in agent.log()


def test_newer_deployment_cancels_a_stuck_download_and_installs(
    fleet_server, mosquitto, agents, published, slow_fleet_repo
):
    """Limits that would wait ten minutes: only the newer desired state can end it."""
    slow_fleet_repo.modes["detector-2.bundle"] = Stall(after=1000)
    agents.enroll("dev", fleet_server.url)
    agent = agents.start("dev", mosquitto, extra_args=(
        "--fleet", slow_fleet_repo.url, "--download-deadline", "600", "--download-floor", "0",
    ))
    wait_until(lambda: fleet_server.device("dev"), timeout=10, what="dev registered")
    _deploy(fleet_server, 1, "dev")
    wait_until(lambda: _active(fleet_server, "dev") == V1, timeout=30, what="v1 active")

    _deploy(fleet_server, 2, "dev")
    wait_until(lambda: slow_fleet_repo.target_requests("detector-2.bundle"), timeout=20,
               what="the v2 download to hang")
    _deploy(fleet_server, 3, "dev")

    wait_until(lambda: _active(fleet_server, "dev") == V3, timeout=30, what="v3 active")
    cancelled = _events(fleet_server, "dev", "cancelled")
    assert [(c["bundle"], c["reason"]) for c in cancelled] == [
        (V2, "superseded by generation 3")
    ]
    assert _events(fleet_server, "dev", "failed") == []
    assert "Traceback" not in agent.log()


def test_rollback_without_a_running_agent_is_reported_when_it_starts(
    fleet_server, mosquitto, agents, published
):
    agents.enroll("dev", fleet_server.url)
    first = agents.start("dev", mosquitto)
    wait_until(lambda: fleet_server.device("dev"), timeout=10, what="dev registered")
    for version, model in ((1, V1), (2, V2)):
        _deploy(fleet_server, version, "dev")
        wait_until(lambda m=model: _active(fleet_server, "dev") == m, timeout=30,
                   what=f"{model} active")
    assert first.terminate() == 0

    offline = _rollback(agents, "dev")

    assert offline.returncode == 0, offline.stderr
    assert "rolled back to detector v1 from detector v2" in offline.stdout
    assert "no agent is running" in offline.stdout
    restarted = agents.start("dev", mosquitto)
    reported = wait_until(lambda: _events(fleet_server, "dev", "rolled_back"), timeout=20,
                          what="the restarted agent to report the rollback")
    assert [(r["from"], r["to"]) for r in reported] == [(V2, V1)]
    wait_until(lambda: _active(fleet_server, "dev") == V1, timeout=10, what="v1 reported")

    # The running agent answers the next one, and refuses it: it would go forward to v2.
    again = _rollback(agents, "dev")
    assert again.returncode == 1
    assert "already rolled back from detector v2 to detector v1" in again.stderr
    assert _active(fleet_server, "dev") == V1
    assert len(_events(fleet_server, "dev", "rolled_back")) == 1
    assert "Traceback" not in restarted.log()


def test_a_second_agent_on_the_same_state_dir_is_refused(fleet_server, mosquitto, agents):
    """One owner of the slots: the lock file is held for the agent's whole life."""
    agents.enroll("dev", fleet_server.url)
    agents.start("dev", mosquitto)
    wait_until(lambda: fleet_server.device("dev"), timeout=10, what="dev registered")

    second = agents.start("dev", mosquitto)

    assert second.process.wait(30) == 1
    assert "another edge-agent is running with state directory" in second.log()
