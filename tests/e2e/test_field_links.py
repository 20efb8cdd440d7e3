"""Bad links between a real agent and the real broker, through the fault proxy.

``edge-agent run`` connects to Mosquitto (production configuration) through
:mod:`tests.fixtures.fault_proxy`; a real ``edge-fleet serve`` watches presence and stores
heartbeats. The link is agent to broker only, so the fleet runs on SQLite alone (its
database is not what is under test; the PostgreSQL runs of the outage tests cover that).

* A black hole (a NAT that forgot the connection: nothing passes, no RST, no FIN) is
  noticed by the agent within 1.5 keepalives (it drops the link itself) and by the fleet,
  through the Last Will the broker publishes when the agent's keepalive lapses, in the
  same bound plus the broker's own lateness (``OFFLINE_MARGIN_S``: Mosquitto 2.0 looks at
  keepalives only every 6 s); after the heal the agent is back within the bound its
  reconnect backoff gives.
* A partition of fixed length within the outbox's budget loses and doubles no heartbeat:
  every telemetry seq the agent logged as queued is stored exactly once.

Every wait is on a condition; the figures are measured from the moment the fault began
(the proxy records it).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text

from fleet.db import make_engine
from tests.fixtures.broker import FLEET_ACCOUNT, PUBLISHER_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until

KEEPALIVE = 2
# The fleet learns of the loss only from the Last Will, which the broker publishes when it
# gives up on the connection. Mosquitto 2.0 (keepalive.c) does so when, in whole seconds,
# more than 1.5 keepalives passed since the last packet (so up to 1 s late), and it looks
# only when more than 5 s passed since it last looked (so up to 6 s late); then the fleet
# stores the will and the test polls the API (1 s). Measured: 6.8 and 7.5 s at keepalive
# 2. The agent's own bound has no such term: it drops the link itself.
OFFLINE_MARGIN_S = 1 + 6 + 1
QUEUED = re.compile(r"queued telemetry seq (\d+)")


def _through(proxy, url: str) -> str:
    """``url`` (a device's broker URL with its credentials) pointed at the proxy."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _online(fleet, device_id: str) -> bool:
    device = fleet.device(device_id)
    return bool(device and device["online"])


@pytest.fixture
def fleet(tmp_path, mosquitto):
    server = start_fleet(tmp_path, mosquitto.url_for(FLEET_ACCOUNT),
                         f"sqlite:///{tmp_path / 'fleet.db'}",
                         publisher_broker_url=mosquitto.url_for(PUBLISHER_ACCOUNT))
    try:
        yield server
    finally:
        server.terminate()


def _stored(fleet, device_id: str) -> list[int]:
    engine = make_engine(fleet.env["EDGEFLEET_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT seq FROM heartbeat WHERE device_id = :d"), {"d": device_id}).all()
    finally:
        engine.dispose()
    return [seq for (seq,) in rows]


@pytest.mark.timeout(180)
def test_black_hole_is_noticed_within_one_and_a_half_keepalives_and_healed(
    fleet, mosquitto, agents, fault_proxy
):
    proxy = fault_proxy(mosquitto.port)
    agent = agents.start("field-1", _through(proxy, mosquitto.url_for("field-1")),
                         keepalive=KEEPALIVE)
    wait_until(lambda: _online(fleet, "field-1") and fleet.device("field-1")["heartbeat"],
               timeout=30, what="field-1 online with a heartbeat")
    lost_before = agent.log().count("lost the broker")

    proxy.black_hole()
    began = proxy.partition_started
    assert began is not None
    noticed: dict[str, float] = {}

    def both_noticed() -> bool:
        now = time.monotonic()
        if "fleet" not in noticed and not _online(fleet, "field-1"):
            noticed["fleet"] = now - began
        if "agent" not in noticed and agent.log().count("lost the broker") > lost_before:
            noticed["agent"] = now - began
        return len(noticed) == 2

    wait_until(both_noticed, timeout=60, interval=0.05, what="the black hole noticed")
    bound = 1.5 * KEEPALIVE
    assert noticed["agent"] <= bound + 0.5, noticed  # + the test's polling of the log
    assert noticed["fleet"] <= bound + OFFLINE_MARGIN_S, noticed

    proxy.heal()
    healed = proxy.healed_at
    assert healed is not None
    wait_until(lambda: _online(fleet, "field-1"), timeout=60, interval=0.05,
               what="field-1 online again after the heal")
    back_s = time.monotonic() - healed
    print(f"black hole: agent noticed after {noticed['agent']:.1f} s, fleet saw offline "
          f"after {noticed['fleet']:.1f} s; online again {back_s:.1f} s after the heal")
    # The attempt under way when the link healed may still wait for its CONNACK (one
    # keepalive); the next is due within its backoff window, at most the cap (30 s).
    assert back_s <= KEEPALIVE + 30 + 3, back_s


def _produced(agent) -> list[int]:
    return [int(seq) for seq in QUEUED.findall(agent.log())]


@pytest.mark.timeout(180)
def test_a_partition_within_the_outbox_budget_loses_and_doubles_no_heartbeat(
    fleet, mosquitto, agents, fault_proxy
):
    proxy = fault_proxy(mosquitto.port)
    agent = agents.start("field-2", _through(proxy, mosquitto.url_for("field-2")),
                         keepalive=KEEPALIVE, interval=0.2, log_level="DEBUG")
    wait_until(lambda: len(_stored(fleet, "field-2")) >= 5, timeout=30,
               what="field-2's first heartbeats stored")

    proxy.partition(4)  # a black hole: the open connection dies, new ones reach nothing
    before = len(_produced(agent))
    wait_until(lambda: not proxy.faulty, timeout=30, what="the partition to heal by itself")
    during = len(_produced(agent)) - before
    assert during >= 10, during  # the agent kept producing while cut off
    wait_until(lambda: len(_produced(agent)) >= before + during + 10, timeout=60,
               what="heartbeats produced after the heal")
    produced = _produced(agent)

    def all_stored() -> list[int] | None:
        stored = _stored(fleet, "field-2")
        return stored if set(produced) <= set(stored) else None

    try:
        stored = wait_until(all_stored, timeout=90, interval=0.5, what="the backlog stored")
    except AssertionError:
        missing = sorted(set(produced) - set(_stored(fleet, "field-2")))
        raise AssertionError(f"{len(missing)} not stored: {missing[:5]}...") from None
    doubled = [seq for seq, count in Counter(stored).items() if count > 1]
    assert doubled == []
    assert len(set(produced)) == len(produced)  # each seq queued once
    print(f"partition 4 s: {during} heartbeats queued while cut off, {len(produced)} "
          f"produced, all stored once")


def test_reconnect_delays_are_drawn_over_their_backoff_window():
    """Full jitter: the first attempt after a loss over ``spread_s``, the one after ``n``
    failures over ``min(cap, base * 2**n)``; without jitter, the plain doubling."""
    import random

    from agent.mqtt import Backoff

    rng = random.Random(7)
    backoff = Backoff(base_s=1, cap_s=30, spread_s=15)
    firsts = [backoff.delay(0, rng) for _ in range(2000)]
    assert 0 <= min(firsts) < 0.5 and 14.5 < max(firsts) <= 15
    assert max(Counter(int(d) for d in firsts).values()) < 2000 / 15 * 1.5  # spread evenly
    assert [backoff.window(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert all(0 <= backoff.delay(n, rng) <= backoff.window(n) for n in range(1, 40))
    plain = Backoff(base_s=1, cap_s=30, spread_s=15, jitter=False)
    assert [plain.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
