"""Restarting the fleet, and starting it wrongly, as an operator would.

Real ``edge-fleet serve`` processes with their zero-set-up local broker, a real
``edge-agent run``; every refusal is a real process exiting with its message.
"""

from __future__ import annotations

import os
import socket
import subprocess

from fleet.local_broker import free_port
from tests.fixtures.processes import console_script, start_fleet
from tests.fixtures.waiting import wait_until


def _serve(tmp_path, data_dir, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*console_script("edge-fleet"), "serve", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "EDGEFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}",
             **(env or {})},
    )


def _refused(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert "Traceback" not in output, output
    return output


def test_agents_find_a_restarted_fleet_by_themselves(tmp_path, agents, database_url):
    fleet = start_fleet(tmp_path, None, database_url)  # its own local broker
    try:
        port = int((fleet.data_dir / "broker-port").read_text())
        agents.enroll_with_code("cam-1", fleet)
        agents.start("cam-1", None, interval=0.5)
        device = wait_until(lambda: (d := fleet.device("cam-1")) and d["online"]
                            and d["heartbeat"] and d, timeout=20, what="cam-1 online")
        first_seen = device["heartbeat"]["uptime_s"]
    finally:
        assert fleet.terminate() == 0
    fleet = start_fleet(tmp_path, None, database_url)  # same data dir: same broker port
    try:
        assert int((fleet.data_dir / "broker-port").read_text()) == port
        wait_until(
            lambda: (d := fleet.device("cam-1")) and d["online"]
            and d["heartbeat"]["uptime_s"] > first_seen,
            timeout=60, what="cam-1 back online through the restarted fleet's broker",
        )
    finally:
        fleet.terminate()


def test_a_second_fleet_on_the_same_data_directory_is_refused(tmp_path, database_url):
    fleet = start_fleet(tmp_path, None, database_url)
    try:
        output = _refused(_serve(tmp_path, fleet.data_dir, "--port", str(free_port())))
        assert f"pid {fleet.process.pid}" in output and "--data-dir" in output
        assert fleet.get("/healthz").json()["ingest_connected"], "the first one is unharmed"
    finally:
        fleet.terminate()


def test_the_admin_token_of_another_database_is_never_overwritten(tmp_path, database_url):
    fleet = start_fleet(tmp_path, None, database_url)
    fleet.terminate()
    token_file = fleet.data_dir / "admin-token"
    before = token_file.read_text()
    # Same data directory, a new empty database (other.db): the token file is not its own.
    output = _refused(_serve(tmp_path, fleet.data_dir, "--port", str(free_port())))
    assert str(token_file) in output and "another database" in output
    assert token_file.read_text() == before


def test_a_busy_api_port_is_named_with_the_option_to_change_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        output = _refused(_serve(tmp_path, tmp_path / "fleet", "--port", str(port)))
    assert f"127.0.0.1:{port} is in use" in output and "--port" in output
