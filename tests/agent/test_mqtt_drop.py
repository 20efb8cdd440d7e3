"""The MQTT link past 1024 open files, and dropping off the network on purpose.

A real (open, loopback) mosquitto; no mocks. ``drop`` must look to everyone else like a lost
network (the broker publishes the Last Will), and ``resume`` connect again with a new one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.mqtt import BrokerAddress, Inbound, MqttLink, Will
from fleet.local_broker import LocalBroker
from tests.fixtures.waiting import wait_until


@pytest.fixture
def open_broker(tmp_path) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


def _link(broker: LocalBroker, client_id: str, got: list[Inbound], will=None) -> MqttLink:
    return MqttLink(BrokerAddress.parse(broker.url), client_id, on_message=got.append,
                    will_factory=will, keepalive=5)


def test_a_link_whose_socket_is_numbered_above_1024_connects_and_talks(open_broker):
    """select(2) cannot watch descriptors >= 1024; the link must not depend on it."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    got: list[Inbound] = []
    link = _link(open_broker, "high-fd", got)
    try:
        link.start()
        assert link.wait_connected(10)
        link.subscribe("t/echo")

        def echoed() -> list[Inbound]:
            if not got:  # until the subscription is in place
                link.publish("t/echo", b"hi")
            return got

        wait_until(echoed, timeout=10, interval=0.2, what="the echo")
        assert got[0].payload == b"hi"
    finally:
        link.close()
        for fd in held:
            os.close(fd)


def test_drop_fires_the_last_will_and_resume_comes_back_with_a_new_one(open_broker):
    wills = iter(range(1, 100))
    seen: list[Inbound] = []
    watcher = _link(open_broker, "watcher", seen)
    device = _link(open_broker, "device", [],
                   will=lambda: Will("dev/status", f"offline {next(wills)}".encode()))
    try:
        watcher.start()
        assert watcher.wait_connected(10)
        watcher.subscribe("dev/status")
        device.start()
        assert device.wait_connected(10)
        device.drop()
        assert not device.connected
        wait_until(lambda: [m.payload for m in seen], timeout=10, what="the Last Will")
        assert seen[-1].payload == b"offline 1"
        device.resume()
        assert device.wait_connected(10)
        device.drop()
        wait_until(lambda: len(seen) >= 2, timeout=10, what="the second Last Will")
        assert seen[-1].payload == b"offline 2"  # armed anew for the new connection
    finally:
        device.close()
        watcher.close()
