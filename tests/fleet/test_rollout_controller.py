"""The rollout controller against a real database (SQLite and PostgreSQL) and the real
signing and assignment code. The broker is replaced by a list of what would have been
published: that boundary is what this test stands in for (tests/e2e/test_rollouts.py
publishes for real, to simulated devices)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from agent.contract import BundleRef, EventMessage, utcnow
from fleet.errors import InvalidRequestError
from fleet.models import AuditEntry, Bundle, Device, RolloutDevice
from fleet.rollouts import controller, store
from fleet.rollouts.machine import Policy, RolloutStatus
from fleet.rollouts.waves import parse_waves

IDS = [f"cam-{i}" for i in range(5)]


@pytest.fixture
def fleet_db(fleet_store):
    engine, repository = fleet_store
    with Session(engine) as session:
        session.add(Bundle(name="m", version=2, target_name="m-2.bundle", sha256="0" * 64,
                           size=1, runtime="onnx", manifest={}))
        session.add_all(Device(id=i, online=True, labels={"site": "lab"}) for i in IDS)
        session.commit()
    return engine, repository.online_signer("director")


def _states(engine) -> dict[str, str]:
    with Session(engine) as session:
        return {r.device_id: r.state for r in session.exec(select(RolloutDevice))}


def test_notifications_keep_to_the_rate_limit_and_nobody_is_notified_twice(fleet_db):
    engine, signer = fleet_db
    policy = Policy(waves=parse_waves("100%"), notify_per_minute=2)
    with Session(engine) as session:
        rollout = store.create_rollout(session, BundleRef(name="m", version=2), policy,
                                       "test", selector="site=lab")
    published: list[str] = []
    now = utcnow()

    def publish(name, _payload):
        published.append(name)

    controller.tick(engine, signer, publish, now)
    controller.tick(engine, signer, publish, now + timedelta(seconds=2))
    assert len(published) == 2, "two a minute"
    controller.tick(engine, signer, publish, now + timedelta(seconds=61))
    assert len(published) == 4 and len(set(published)) == 4, "nobody twice"
    assert sorted(_states(engine).values()) == ["notified"] * 4 + ["pending"]

    with Session(engine) as session:  # the device's events move it along
        for event in ("downloading", "installed", "healthy"):
            store.on_event(session, EventMessage(
                device_id=published[0].split("/")[3], seq=len(event), sent_at=utcnow(),
                event=event, detail={"bundle": {"name": "m", "version": 2}}))
        session.commit()
    assert "healthy" in _states(engine).values()

    with Session(engine) as session:
        paused = store.set_status(session, rollout.id, RolloutStatus.PAUSED, "test", "wait")
    assert paused.status == "paused"
    controller.tick(engine, signer, publish, now + timedelta(minutes=5))
    assert len(published) == 4, "a paused rollout notifies nobody"
    with Session(engine) as session, pytest.raises(InvalidRequestError, match="cannot pause"):
        store.set_status(session, rollout.id, RolloutStatus.PAUSED, "test", "again")


def test_a_device_in_an_active_rollout_cannot_join_another(fleet_db):
    engine, _ = fleet_db
    with Session(engine) as session:
        store.create_rollout(session, BundleRef(name="m", version=2), Policy(), "test",
                             device_ids=IDS[:2])
        with pytest.raises(InvalidRequestError, match="cam-1"):
            store.create_rollout(session, BundleRef(name="m", version=2), Policy(), "test",
                                 device_ids=IDS[1:3])
        with pytest.raises(InvalidRequestError, match="no device matches"):
            store.create_rollout(session, BundleRef(name="m", version=2), Policy(), "test",
                                 selector="site=mars")


def test_devices_that_come_to_match_a_running_rollout_join_its_wave_in_progress(fleet_db):
    engine, signer = fleet_db
    policy = Policy(waves=parse_waves("2,100%"), bake_s=3600)
    with Session(engine) as session:
        rollout = store.create_rollout(session, BundleRef(name="m", version=2), policy,
                                       "test", selector="site=lab")
    published: list[str] = []
    now = utcnow()
    controller.tick(engine, signer, lambda name, _p: published.append(name), now)
    assert len(published) == 2, "the first wave: two devices"

    with Session(engine) as session:  # a new device, and one relabelled into the selector
        session.add(Device(id="cam-new", online=True, labels={"site": "lab"}))
        session.add(Device(id="cam-moved", online=True, labels={"site": "annex"}))
        session.add(Device(id="cam-busy", online=True, labels={"site": "annex"}))
        session.commit()
        elsewhere = store.create_rollout(session, BundleRef(name="m", version=2), policy,
                                         "test", device_ids=["cam-busy"])
        moved = session.get(Device, "cam-moved")
        moved.tags = {"site": "lab"}
        busy = session.get(Device, "cam-busy")
        busy.tags = {"site": "lab"}
        session.add_all([moved, busy])
        session.commit()

    controller.tick(engine, signer, lambda name, _p: published.append(name),
                    now + timedelta(seconds=1), pickup_every_s=10)
    assert "cam-new" not in _states(engine), "not looked for again within pickup_every_s"
    controller.tick(engine, signer, lambda name, _p: published.append(name),
                    now + timedelta(seconds=11), pickup_every_s=10)
    with Session(engine) as session:
        rows = {r.device_id: r for r in session.exec(select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id))}
        joined = {d: rows[d].wave for d in ("cam-new", "cam-moved")}
        assert joined == {"cam-new": 0, "cam-moved": 0}, "the wave in progress, not a later one"
        assert "cam-busy" not in rows, f"left to its own rollout {elsewhere.id}"
        assert rows["cam-new"].state == "notified"
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "rollout.join")).one()
        assert entry.details["devices"] == ["cam-moved", "cam-new"]
        assert entry.details["in_another_rollout"] == ["cam-busy"]
    assert sum(p.split("/")[3] == "cam-new" for p in published) == 1


def test_the_offline_gate_counts_restarts_and_long_silences_not_reconnections(fleet_db):
    """A broker restart reconnects every device: that alone must not halt a rollout."""
    engine, signer = fleet_db
    now = utcnow()
    with Session(engine) as session:
        for device in session.exec(select(Device)):
            device.heartbeat = {"uptime_s": 100.0, "inference_count": 0, "error_count": 0}
            device.active_model_name, device.active_model_version = "m", 1
            session.add(device)
        session.commit()
        rollout = store.create_rollout(session, BundleRef(name="m", version=2),
                                       Policy(waves=parse_waves("100%")), "test",
                                       selector="site=lab")
    controller.tick(engine, signer, lambda *_: None, now)
    with Session(engine) as session:
        for device_id in IDS:
            store.on_event(session, EventMessage(
                device_id=device_id, seq=1, sent_at=now, event="healthy",
                detail={"bundle": {"name": "m", "version": 2}}))
        changes = {
            "cam-0": {"connection": 7, "uptime_s": 130.0},  # reconnected: not counted
            "cam-1": {"uptime_s": 3.0},  # its agent restarted since: counted
            "cam-2": {"online": False, "last_seen": now - timedelta(seconds=5)},  # blip
            "cam-3": {"online": False, "last_seen": now - timedelta(minutes=5)},  # gone
        }
        for device_id, change in changes.items():
            device = session.get(Device, device_id)
            beat = dict(device.heartbeat)
            if "uptime_s" in change:
                beat["uptime_s"] = change["uptime_s"]
            device.heartbeat = beat
            device.connection = change.get("connection", device.connection)
            device.online = change.get("online", device.online)
            device.last_seen = change.get("last_seen", device.last_seen)
            session.add(device)
        session.commit()
        view = store.load_view(session, session.get(type(rollout), rollout.id), now)
    gone = sorted(d.device_id for d in view.devices if d.figures and d.figures.went_offline)
    assert gone == ["cam-1", "cam-3"]


def test_one_worker_ticks_at_a_time_and_the_others_skip_their_turn(fleet_db):
    engine, signer = fleet_db
    with Session(engine) as session:
        store.create_rollout(session, BundleRef(name="m", version=2),
                             Policy(waves=parse_waves("100%")), "test", selector="site=lab")
    published: list[str] = []
    with controller.controller_turn(engine) as mine:
        assert mine
        if engine.dialect.name == "postgresql":  # another worker's tick meanwhile: skipped
            assert controller.tick(engine, signer, lambda n, _p: published.append(n)) == []
            assert published == []
    done = controller.tick(engine, signer, lambda n, _p: published.append(n))
    assert done and len(published) == len(IDS), "the turn is free again once released"
