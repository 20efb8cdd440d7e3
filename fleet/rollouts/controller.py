"""The rollout controller: the IO around ``fleet.rollouts.machine.decide``.

Each tick reads every running rollout, asks the machine what to do, carries it out and
records it, one rollout per transaction. One worker ticks at a time: on PostgreSQL it
holds an advisory lock for the tick and the others skip theirs. The rollout's row is also
locked for its transaction (``SELECT ... FOR UPDATE``), so even two ticks that overlapped
would take turns and the second would decide on what the first stored: a device is
notified once per step, whichever worker gets there. State is stored before anything is
published: a controller killed between the two leaves a desired state stored and
unpublished, which ``fleet.desired_resend`` publishes; it is never notified twice for the
same step. (On SQLite, whose single writer
has no row locks, run one fleet worker: the data directory lock already means one.)

Every decision lands in the audit log as ``system:controller`` with the figures behind it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agent.contract import BundleRef, Channel, topic, utcnow
from fleet import audit, deployments
from fleet.models import Device, DeviceDesired, Rollout, RolloutDevice
from fleet.rollouts.machine import (
    Action,
    Advance,
    Complete,
    DeviceState,
    Halt,
    MarkStuck,
    Notify,
    Redrive,
    RollBack,
    RolloutStatus,
    decide,
)
from fleet.rollouts.store import load_view, pick_up_new_matches

__all__ = ["ACTOR", "controller_turn", "tick"]

log = logging.getLogger(__name__)

ACTOR = "system:controller"
Publisher = Callable[[str, bytes], None]


# When each running rollout last looked for devices newly matching its selector (in this
# process: after a restart it looks again at once, which is harmless).
_last_pickup: dict[str, datetime] = {}


# The PostgreSQL advisory lock key one ticking controller holds ("edgefleet rollouts").
ADVISORY_KEY = 0x6564_6766_726F_6C6C & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def controller_turn(engine: Engine) -> Iterator[bool]:
    """Whether this worker may tick now: on PostgreSQL, one worker at a time holds a
    session advisory lock for its whole tick and the others skip theirs (the row locks
    below would make them wait and then find nothing to do). SQLite has one writer, and
    its data directory's lock already means one fleet."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as connection:
        held = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                       {"key": ADVISORY_KEY}).scalar())
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": ADVISORY_KEY})
                connection.commit()


def tick(engine: Engine, signer, publish: Publisher, now: datetime | None = None,
         pickup_every_s: float = 10.0) -> list[str]:
    """Advance every running rollout by what is due now; returns what was done (nothing
    while another worker holds the controller's turn)."""
    with controller_turn(engine) as mine:
        if not mine:
            return []
        return _tick(engine, signer, publish, now or utcnow(), pickup_every_s)


def _tick(engine: Engine, signer, publish: Publisher, now: datetime,
          pickup_every_s: float) -> list[str]:
    with Session(engine) as session:
        running = list(session.exec(select(Rollout.id).where(
            Rollout.status == RolloutStatus.RUNNING.value)))
    for ended in set(_last_pickup) - set(running):  # only running rollouts pick up
        del _last_pickup[ended]
    done: list[str] = []
    for rollout_id in running:
        with Session(engine) as session:
            rollout = session.get(Rollout, rollout_id, with_for_update=True)
            if rollout is None or rollout.status != RolloutStatus.RUNNING.value:
                continue  # another worker finished or paused it meanwhile
            last = _last_pickup.get(rollout_id)
            if last is None or (now - last).total_seconds() >= pickup_every_s:
                _last_pickup[rollout_id] = now
                joined = pick_up_new_matches(session, rollout, ACTOR)
                if joined:
                    done.append(f"rollout:{rollout_id}: {len(joined)} device(s) joined "
                                f"wave {rollout.wave + 1}")
            actions = decide(load_view(session, rollout, now), now)
            for action in actions:
                done.append(_apply(session, rollout, action, signer, publish, now))
            session.commit()
    return done


def _apply(session: Session, rollout: Rollout, action: Action, signer, publish: Publisher,
           now: datetime) -> str:
    subject = f"rollout:{rollout.id}"
    if isinstance(action, Notify):
        _notify(session, rollout, list(action.device_ids), signer, publish, now)
        return f"{subject}: notified {len(action.device_ids)} device(s)"
    if isinstance(action, Redrive):
        _redrive(session, rollout, list(action.device_ids), publish, now)
        return f"{subject}: re-drove {len(action.device_ids)} device(s)"
    if isinstance(action, MarkStuck):
        rows = _rows(session, rollout, action.device_ids)
        for row in rows:
            row.state = DeviceState.STUCK.value
            session.add(row)
        audit.record(session, ACTOR, "rollout.stuck", subject,
                     f"{len(rows)} device(s) made no progress after their re-drives",
                     {"devices": list(action.device_ids)[:200]})
        return f"{subject}: {len(rows)} device(s) stuck"
    if isinstance(action, Advance):
        audit.record(session, ACTOR, "rollout.advance", subject,
                     f"wave {rollout.wave + 1} passed its gates",
                     {"from_wave": rollout.wave + 1, "to_wave": action.to_wave + 1,
                      "gates": [g.as_record() for g in action.gates]})
        rollout.wave, rollout.wave_started_at = action.to_wave, now
        session.add(rollout)
        return f"{subject}: wave {action.to_wave + 1}"
    if isinstance(action, Complete):
        audit.record(session, ACTOR, "rollout.complete", subject, "every wave passed",
                     {"gates": [g.as_record() for g in action.gates]})
        rollout.status, rollout.finished_at = RolloutStatus.COMPLETED.value, now
        session.add(rollout)
        return f"{subject}: completed"
    if isinstance(action, Halt):
        audit.record(session, ACTOR, "rollout.halt", subject, action.reason,
                     {"wave": rollout.wave + 1, "gates": [g.as_record() for g in action.gates]})
        rollout.status, rollout.reason, rollout.finished_at = (
            RolloutStatus.HALTED.value, action.reason, now)
        session.add(rollout)
        return f"{subject}: halted ({action.reason})"
    assert isinstance(action, RollBack)
    return _roll_back(session, rollout, list(action.device_ids), signer, publish)


def _rows(session: Session, rollout: Rollout, device_ids) -> list[RolloutDevice]:
    return list(session.exec(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id,
        col(RolloutDevice.device_id).in_(list(device_ids)))))


def _notify(session: Session, rollout: Rollout, device_ids: list[str], signer,
            publish: Publisher, now: datetime) -> None:
    """Remember what each device shows before its install, then deploy to it. The rows and
    the desired states commit together (``assign`` commits the session)."""
    by_id = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(device_ids)))}
    for row in _rows(session, rollout, device_ids):
        device = by_id.get(row.device_id)
        beat = (device.heartbeat if device else None) or {}
        row.state, row.notified_at = DeviceState.NOTIFIED.value, now
        row.inferences_at_install = int(beat.get("inference_count", 0))
        row.model_errors_at_install = int(beat.get("error_count", 0))
        row.client_errors_at_install = int(beat.get("client_error_count", 0))
        row.latency_p95_before = (beat.get("latency_ms_p95")
                                  if device and device.active_model_name else None)
        uptime = beat.get("uptime_s")
        row.uptime_at_notify = float(uptime) if isinstance(uptime, int | float) else None
        if device and device.active_model_name is not None:
            row.prev_bundle_name = device.active_model_name
            row.prev_bundle_version = device.active_model_version
        session.add(row)
    deployments.assign(session, signer, publish,
                       BundleRef(name=rollout.bundle_name, version=rollout.bundle_version),
                       device_ids, issued_by=ACTOR,
                       reason=f"rollout {rollout.id}, wave {rollout.wave + 1}")
    # assign committed: take the rollout's row lock again for the rest of this tick
    session.get(Rollout, rollout.id, with_for_update=True)


def _redrive(session: Session, rollout: Rollout, device_ids: list[str], publish: Publisher,
             now: datetime) -> None:
    payloads = {row.device_id: row.payload for row in session.exec(select(DeviceDesired).where(
        col(DeviceDesired.device_id).in_(device_ids)))}
    rows = _rows(session, rollout, device_ids)
    for row in rows:
        row.state, row.notified_at, row.redrives = (
            DeviceState.NOTIFIED.value, now, row.redrives + 1)
        session.add(row)
    audit.record(session, ACTOR, "rollout.redrive", f"rollout:{rollout.id}",
                 f"{len(rows)} device(s) silent since their notification",
                 {"devices": device_ids[:200]})
    session.commit()
    for device_id in device_ids:
        payload = payloads.get(device_id)
        if payload:
            publish(topic(device_id, Channel.DESIRED), payload.encode())
    session.get(Rollout, rollout.id, with_for_update=True)


def _roll_back(session: Session, rollout: Rollout, device_ids: list[str], signer,
               publish: Publisher) -> str:
    """Point the wave's updated devices back at the bundle each ran before. A device that
    ran no model before is left as it is (there is nothing to go back to) and named."""
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    nothing_before: list[str] = []
    for row in _rows(session, rollout, device_ids):
        if row.prev_bundle_name is None or row.prev_bundle_version is None:
            nothing_before.append(row.device_id)
            continue
        groups[(row.prev_bundle_name, row.prev_bundle_version)].append(row.device_id)
        row.state = DeviceState.ROLLED_BACK.value
        session.add(row)
    audit.record(session, ACTOR, "rollout.rollback", f"rollout:{rollout.id}",
                 f"rolling {sum(map(len, groups.values()))} device(s) back",
                 {"to": {f"{n}:{v}": ids[:200] for (n, v), ids in groups.items()},
                  "no_previous_bundle": nothing_before[:200]})
    for (name, version), ids in groups.items():
        deployments.assign(session, signer, publish, BundleRef(name=name, version=version),
                           ids, issued_by=ACTOR, reason=f"rollout {rollout.id} halted")
    session.commit()
    note = f"; {len(nothing_before)} ran no model before" if nothing_before else ""
    return f"rollout:{rollout.id}: rolled {sum(map(len, groups.values()))} device(s) back{note}"
