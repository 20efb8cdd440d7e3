"""The MQTT link says what goes wrong with the broker: where, why, and when it tries again.

Real paho clients against a closed port, an unresolvable name and a real Mosquitto that
refuses a password or goes away; the log lines are read as an operator reads them.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
from collections.abc import Iterator

import pytest

from agent.mqtt import BrokerAddress, FailureLog, MqttLink
from tests.fixtures.broker import client_id_for
from tests.fixtures.waiting import wait_until

_RETRY = re.compile(r"retrying in (\d+(?:\.\d)?) s")


def _failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "agent.mqtt" and "reach the broker" in r.getMessage()]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port held bound but not listening for the whole test: every connection to it is
    refused. A port merely freed could be taken meanwhile by another process, or by the
    kernel as the client's own ephemeral port (a TCP self-connect), and one attempt would
    then not fail the way the test expects."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    try:
        yield held.getsockname()[1]
    finally:
        held.close()


@pytest.fixture
def link_to() -> Iterator:
    links: list[MqttLink] = []

    def make(url: str, client_id: str = "test-link", max_backoff: int = 2) -> MqttLink:
        link = MqttLink(BrokerAddress.parse(url), client_id, on_message=lambda _m: None,
                        max_backoff=max_backoff)
        links.append(link)
        link.start()
        return link

    yield make
    for link in links:
        link.close()


def test_failure_log_warns_on_the_first_failure_then_at_most_once_a_minute():
    failures = FailureLog(every_s=60)
    levels = [failures.failed(float(t), "mqtt://h:1", "refused", 30)[0] for t in range(0, 185, 5)]
    warnings = [i * 5 for i, level in enumerate(levels) if level == logging.WARNING]
    assert warnings == [0, 60, 120, 180]
    assert set(levels) == {logging.WARNING, logging.DEBUG}
    level, text = failures.failed(200.0, "mqtt://h:1", "refused", 30)
    assert level == logging.DEBUG and "attempt 38" in text and "retrying in 30.0 s" in text
    assert failures.connected(250.0) == "after 38 failed attempt(s) in 4 min 10 s"
    # A new outage starts a new run: its first failure is a warning again.
    assert failures.connected(251.0) is None
    level, text = failures.failed(300.0, "mqtt://h:1", "refused", 1)
    assert level == logging.WARNING and text.startswith("cannot reach the broker mqtt://h:1")


def test_nothing_listening_is_logged_with_the_address_the_reason_and_the_next_attempt(
    caplog, link_to, refusing_port
):
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    port = refusing_port
    link_to(f"mqtt://127.0.0.1:{port}")
    records = wait_until(lambda: (found := _failures(caplog)) and len(found) >= 3 and found,
                         timeout=30, what="three failed attempts logged")
    first = records[0]
    assert first.levelno == logging.WARNING
    assert f"cannot reach the broker mqtt://127.0.0.1:{port}: connection refused" in (
        first.getMessage())
    assert all(r.levelno == logging.DEBUG for r in records[1:3])
    # Each line says when the next attempt comes, and the next attempt comes then: never
    # before (the 0.5 s is the log's rounding and the attempt's own time), and late only
    # by what a loaded machine adds (3.5 s seen for a promised 2.0 s on a busy CI run).
    for said, then in itertools.pairwise(records[:3]):
        promised = float(_RETRY.search(said.getMessage()).group(1))
        late_s = (then.created - said.created) - promised
        assert -0.5 < late_s < 3.0, (said.getMessage(), then.created - said.created)


def test_a_host_name_that_does_not_resolve_is_named(caplog, link_to):
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    link_to("mqtt://no-such-broker.invalid:1883")
    first = wait_until(lambda: _failures(caplog), timeout=30, what="a failure logged")[0]
    assert first.levelno == logging.WARNING
    assert "mqtt://no-such-broker.invalid:1883: the host name does not resolve" in (
        first.getMessage())


def test_a_refusal_by_the_broker_is_logged_and_a_return_says_how_long_it_took(
    caplog, link_to, mosquitto
):
    caplog.set_level(logging.DEBUG, logger="agent.mqtt")
    good = mosquitto.url_for("dev-1")
    bad = re.sub(r"://dev-1:[^@]+@", "://dev-1:wrong@", good)
    refusing = link_to(bad, client_id=client_id_for("dev-1"))
    refused = wait_until(lambda: _failures(caplog), timeout=30, what="the refusal logged")[0]
    assert refused.levelno == logging.WARNING
    assert "the broker refused the connection: Not authorized" in refused.getMessage()
    refusing.close()

    caplog.clear()
    link = link_to(good, client_id=client_id_for("dev-1"))
    assert link.wait_connected(20)
    mosquitto.stop()
    wait_until(lambda: _failures(caplog), timeout=30, what="the lost broker's failures logged")
    mosquitto.start()
    assert link.wait_connected(60)
    back = wait_until(
        lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith(
            f"connected to {link.broker} after")],
        timeout=10, what="the reconnection logged")
    assert re.fullmatch(r"connected to \S+ after \d+ failed attempt\(s\) in \d+ s", back[0])
