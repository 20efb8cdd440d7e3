"""The agent tells systemd it is ready, alive and stopping (``Type=notify``, ``WatchdogSec``).

A real Unix datagram socket bound by the test stands in for systemd's ``$NOTIFY_SOCKET``;
the daemon is a real ``edge-agent run`` process on a real broker, and the hung-loop test
runs the real daemon in-process with its main loop's work blocked on purpose.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator

import pytest

from agent.daemon import AgentConfig, AgentDaemon
from agent.mqtt import BrokerAddress
from agent.sd_notify import Notifier
from tests.fixtures.waiting import wait_until


class NotifySocket:
    """What systemd would receive: every datagram sent to ``address``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def lines(self) -> list[str]:
        return [line for message in self.received() for line in message.split("\n")]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines()
                if line.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # sun_path holds 108 bytes
    listener = NotifySocket(f"{directory}/notify")
    try:
        yield listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("starting")
    notifier.alive("up")
    notifier.stopping()
    assert notifier.pulse_s(10.0) == 10.0


def test_notifications_reach_a_path_socket_and_status_is_sent_when_it_changes(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    notifier.ready("connected to mqtt://broker:1883")
    notifier.alive("connected to mqtt://broker:1883")  # no watchdog, same status: nothing
    notifier.alive("NOT connected to mqtt://broker:1883")
    notifier.stopping()
    assert notify_socket.received() == [
        "READY=1\nSTATUS=connected to mqtt://broker:1883",
        "STATUS=NOT connected to mqtt://broker:1883",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_an_abstract_socket_name_is_understood():
    listener = NotifySocket(f"@edgefleet-test-{uuid.uuid4().hex}")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "4000000"})
        notifier.alive("up")
        assert listener.received() == ["WATCHDOG=1\nSTATUS=up"]
        assert notifier.pulse_s(10.0) == 2.0  # half the watchdog period
        assert notifier.pulse_s(1.0) == 1.0
    finally:
        listener.close()


def test_a_watchdog_meant_for_another_process_is_not_pinged(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "4000000",
                         "WATCHDOG_PID": "1"})
    assert notifier.watchdog_s is None
    notifier.alive("up")
    assert notify_socket.received() == ["STATUS=up"]


def test_a_socket_nobody_listens_on_is_logged_once_and_ignored(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000000"})
    notifier.ready("a")
    notifier.alive("b")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_a_running_agent_says_ready_pings_the_watchdog_reports_status_and_stopping(
        notify_socket, mosquitto, agents):
    # A 3 s watchdog against a 30 s heartbeat interval: the loop must wake every 1.5 s.
    agent = agents.start("cam-sd", mosquitto, interval=30, env={
        "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "3000000"})
    wait_until(lambda: notify_socket.count("READY=1") == 1, timeout=60,
               what=f"READY=1 from the agent; log:\n{agent.log()}")
    wait_until(lambda: any(s.startswith("connected to mqtt://cam-sd@")
                           for s in notify_socket.statuses()), timeout=60,
               what=f"a connected STATUS; got {notify_socket.statuses()}")
    assert "no model installed" in notify_socket.statuses()[-1]
    wait_until(lambda: notify_socket.count("WATCHDOG=1") >= 3, timeout=30,
               what="three watchdog pings well within one heartbeat interval")
    assert notify_socket.lines().index("READY=1") < notify_socket.lines().index("WATCHDOG=1")
    assert notify_socket.count("STOPPING=1") == 0
    assert agent.terminate(timeout=30) == 0
    assert notify_socket.count("STOPPING=1") == 1
    assert notify_socket.lines()[-2:] == ["STOPPING=1", "STATUS=stopping"]


def test_a_hung_main_loop_stops_the_watchdog_pings(notify_socket, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = AgentDaemon(AgentConfig(
        broker=BrokerAddress.parse("mqtt://127.0.0.1:1"), device_id="hung",
        state_dir=tmp_path / "state", interval_s=0.2, listen=None, control_socket=False))
    hang, hanging, release = threading.Event(), threading.Event(), threading.Event()
    real_tick = daemon.tick

    def tick() -> None:  # the fault: the loop's work blocks (a stuck disk, a deadlock)
        if hang.is_set() and not release.is_set():
            hanging.set()
            release.wait(60)
        real_tick()

    monkeypatch.setattr(daemon, "tick", tick)
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    try:
        wait_until(lambda: notify_socket.count("WATCHDOG=1") >= 3, timeout=30,
                   what="watchdog pings from a healthy loop")
        hang.set()
        wait_until(hanging.is_set, timeout=30, what="the loop to hang")
        pings = notify_socket.count("WATCHDOG=1")
        # Ten watchdog periods with no ping is what makes systemd restart the service.
        assert not wait_for_more(notify_socket, pings, seconds=4.0)
        release.set()
        wait_until(lambda: notify_socket.count("WATCHDOG=1") > pings, timeout=30,
                   what="pings again once the loop turns")
    finally:
        release.set()
        daemon.stop()
        loop.join(30)
    assert not loop.is_alive()
    assert notify_socket.count("STOPPING=1") == 1


def wait_for_more(listener: NotifySocket, pings: int, seconds: float) -> bool:
    """True as soon as another ping arrives within ``seconds``; False if none does."""
    try:
        wait_until(lambda: listener.count("WATCHDOG=1") > pings, timeout=seconds,
                   what="a ping")
    except AssertionError:
        return False
    return True

