"""Desired states that always arrive: what is published again, when, and how often.

Real database (SQLite and PostgreSQL), real signing and the real assignment code; the
broker is replaced by a list of what would have been published: that boundary is what
this test stands in for (the e2e tests publish for real).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session

from agent.contract import BundleRef, utcnow
from fleet import deployments
from fleet.desired_resend import resend_unacknowledged
from fleet.models import Bundle, Device, DeviceDesired


@pytest.fixture
def fleet_db(fleet_store):
    engine, repository = fleet_store
    with Session(engine) as session:
        session.add(Bundle(name="m", version=1, target_name="m-1.bundle", sha256="0" * 64,
                           size=1, runtime="onnx", manifest={}))
        for device_id, online in (("on-1", True), ("on-2", True), ("off-1", False)):
            session.add(Device(id=device_id, online=online))
        session.commit()
    return engine, repository


def _deploy(engine, repository, published: list) -> dict[str, int]:
    with Session(engine) as session:
        return deployments.assign(
            session, repository.online_signer("director"),
            lambda name, payload: published.append((name, payload)),
            BundleRef(name="m", version=1), ["on-1", "on-2", "off-1"], issued_by="test")


def test_only_online_devices_behind_their_desired_state_get_it_again(fleet_db):
    engine, repository = fleet_db
    first: list = []
    generations = _deploy(engine, repository, first)
    with Session(engine) as session:  # on-2 acknowledges: it reports the generation
        device = session.get(Device, "on-2")
        device.desired_generation = generations["on-2"]
        session.add(device)
        session.commit()

    again: list = []
    with Session(engine) as session:
        too_soon = resend_unacknowledged(session, lambda *a: again.append(a), timeout_s=60)
        later = resend_unacknowledged(session, lambda *a: again.append(a), timeout_s=60,
                                      now=utcnow() + timedelta(seconds=61))
    assert too_soon == [] and later == ["on-1"]
    sent_first = dict(first)
    assert again == [(name, sent_first[name]) for name, _ in again], "unchanged payload"
    with Session(engine) as session:
        row = session.get(DeviceDesired, "on-1")
        assert row.publish_count == 2 and row.generation == generations["on-1"]


def test_resending_backs_off_and_stops_after_its_attempts(fleet_db):
    engine, repository = fleet_db
    _deploy(engine, repository, [])
    sent: list = []
    start = utcnow()
    for minutes in range(0, 60):
        with Session(engine) as session:
            resend_unacknowledged(session, lambda name, _p, m=minutes: sent.append((m, name)),
                                  timeout_s=60, max_attempts=4,
                                  now=start + timedelta(minutes=minutes, seconds=1))
    on_1 = [minute for minute, name in sent if name.endswith("on-1/desired")]
    assert on_1 == [1, 3, 7], "after 1, then 2, then 4 minutes; 4 publications in all"
    assert not any(name.endswith("off-1/desired") for _, name in sent)
