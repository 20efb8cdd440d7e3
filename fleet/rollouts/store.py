"""Rollouts in the database: creating one, reading it back as the machine's view, and
moving its devices along as their events arrive.

Everything a restarted controller needs is in the ``rollout`` and ``rollout_device`` rows:
the wave in progress and when it started, each device's wave (fixed at creation, by
``fleet.rollouts.waves``), state, notification time and re-drives, and the figures it
showed before its install, which the gates compare with what it shows after.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import UTC, datetime, timedelta
from http import HTTPStatus

from sqlmodel import Session, col, select

from agent.contract import BundleRef, EventMessage, utcnow
from fleet import audit, devices
from fleet.drift import store as drift_store
from fleet.drift.compare import output_shift
from fleet.drift.judge import DEFAULT_MIN_ROWS
from fleet.errors import FleetError, InvalidRequestError, NotFoundError, UnknownDevicesError
from fleet.models import Device, ProtectedGroup, Rollout, RolloutDevice
from fleet.registry import find_bundle
from fleet.rollouts.gates import DeviceFigures, GatePolicy
from fleet.rollouts.machine import (
    DeviceState,
    DeviceView,
    Policy,
    RolloutStatus,
    RolloutView,
    TransitionError,
    state_for_event,
    transition,
)
from fleet.rollouts.waves import assign_waves, parse_waves
from fleet.selectors import Selector, effective_labels

__all__ = [
    "ACTIVE",
    "ApprovalError",
    "RolloutStateError",
    "active_rollout_of",
    "approve",
    "create_rollout",
    "get_rollout",
    "load_view",
    "on_event",
    "pick_up_new_matches",
    "policy_from_dict",
    "policy_to_dict",
    "protect_group",
    "set_status",
]

log = logging.getLogger(__name__)

ACTIVE = (RolloutStatus.RUNNING.value, RolloutStatus.PAUSED.value,
          RolloutStatus.AWAITING_APPROVAL.value)


class ApprovalError(FleetError):
    """The rollout's creator may not approve it."""

    reason = "approval_by_creator"
    status = HTTPStatus.FORBIDDEN


class RolloutStateError(InvalidRequestError):
    """An operator action the rollout's status does not allow (resume a completed one)."""

    reason = "rollout_state"


def policy_to_dict(policy: Policy) -> dict:
    return {
        "waves": [str(w) for w in policy.waves], "bake_s": policy.bake_s,
        "gates": dataclasses.asdict(policy.gates),
        "roll_back_on_failure": policy.roll_back_on_failure,
        "roll_back_scope": policy.roll_back_scope,
        "stuck_timeout_s": policy.stuck_timeout_s, "max_redrives": policy.max_redrives,
        "notify_per_minute": policy.notify_per_minute,
    }


def policy_from_dict(data: dict) -> Policy:
    return Policy(
        waves=parse_waves(",".join(data["waves"])), bake_s=float(data["bake_s"]),
        gates=GatePolicy(**data["gates"]),
        roll_back_on_failure=bool(data["roll_back_on_failure"]),
        # Rollouts stored before the scope existed rolled every updated device back.
        roll_back_scope=data.get("roll_back_scope", "all"),
        stuck_timeout_s=float(data["stuck_timeout_s"]), max_redrives=int(data["max_redrives"]),
        notify_per_minute=data.get("notify_per_minute"),
    )


def create_rollout(
    session: Session,
    bundle: BundleRef,
    policy: Policy,
    actor: str,
    selector: str | None = None,
    device_ids: list[str] | None = None,
    paused: bool = False,
) -> Rollout:
    """Target the devices (a selector, or ids the fleet knows), place each in its wave, and
    start (``paused``: wait for a resume, so an operator can look at the waves first). A
    device already in another active rollout is refused by name: two rollouts steering one
    device would undo each other."""
    if find_bundle(session, bundle.name, bundle.version) is None:
        raise NotFoundError(f"no published bundle {bundle.name} v{bundle.version}")
    if (selector is None) == (device_ids is None):
        raise InvalidRequestError("give a selector or device ids, not both")
    if selector is not None:
        parsed = Selector.parse(selector)
        targets = [d.id for d in devices.matching(session, parsed)]
        selector = str(parsed)
    else:
        assert device_ids is not None
        known = {d.id for d in session.exec(select(Device).where(
            col(Device.id).in_(sorted(set(device_ids)))))}
        unknown = sorted(set(device_ids) - known)
        if unknown:
            raise UnknownDevicesError(f"unknown devices: {', '.join(unknown[:20])}")
        targets = sorted(known)
    if not targets:
        raise InvalidRequestError(f"no device matches {selector or device_ids!r}")
    busy = _in_active_rollouts(session, targets)
    if busy:
        raise RolloutStateError(
            f"already in an active rollout: {', '.join(sorted(busy)[:20])}")
    protected = _protected_groups_of(session, targets)
    rollout_id = uuid.uuid4().hex[:12]
    audit.lock_chain(session)
    status = (RolloutStatus.AWAITING_APPROVAL if protected else
              RolloutStatus.PAUSED if paused else RolloutStatus.RUNNING)
    rollout = Rollout(
        id=rollout_id, bundle_name=bundle.name, bundle_version=bundle.version,
        selector=selector, policy=policy_to_dict(policy), status=status.value,
        wave=0, wave_started_at=utcnow() if status is RolloutStatus.RUNNING else None,
        created_by=actor,
        reason=f"awaiting approval: reaches protected {', '.join(protected)}"
        if protected else None,
    )
    session.add(rollout)
    waves = assign_waves(rollout_id, targets, policy.waves)
    for index, members in enumerate(waves):
        session.add_all(RolloutDevice(rollout_id=rollout_id, device_id=d, wave=index,
                                      state=DeviceState.PENDING.value) for d in members)
    audit.record(session, actor, "rollout.create", f"rollout:{rollout_id}",
                 f"{bundle.name} v{bundle.version} to {len(targets)} device(s)",
                 {"bundle": bundle.name, "version": bundle.version, "selector": selector,
                  "devices": len(targets), "waves": [len(w) for w in waves],
                  "protected": protected, "paused": paused,
                  "policy": policy_to_dict(policy)})
    session.commit()
    session.refresh(rollout)
    return rollout


def _in_active_rollouts(session: Session, device_ids: list[str]) -> set[str]:
    """Which of these devices an active rollout already steers."""
    return set(session.exec(
        select(RolloutDevice.device_id).join(Rollout, col(Rollout.id) == col(
            RolloutDevice.rollout_id))
        .where(col(Rollout.status).in_(ACTIVE))
        .where(col(RolloutDevice.device_id).in_(device_ids))))


def pick_up_new_matches(session: Session, rollout: Rollout, actor: str) -> list[str]:
    """Devices that have come to match a running rollout's selector since it was created
    (a new device, new labels or tags) join the wave in progress: finished waves are never
    reopened, and a device in another active rollout is left to it. Returns who joined."""
    if rollout.selector is None:
        return []
    matching = {d.id for d in devices.matching(session, Selector.parse(rollout.selector))}
    if not matching:
        return []
    already = set(session.exec(select(RolloutDevice.device_id).where(
        RolloutDevice.rollout_id == rollout.id)))
    candidates = sorted(matching - already)
    if not candidates:
        return []
    busy = _in_active_rollouts(session, candidates)
    joining = [d for d in candidates if d not in busy]
    if not joining:
        return []
    session.add_all(RolloutDevice(rollout_id=rollout.id, device_id=d, wave=rollout.wave,
                                  state=DeviceState.PENDING.value) for d in joining)
    audit.record(session, actor, "rollout.join", f"rollout:{rollout.id}",
                 f"{len(joining)} device(s) came to match {rollout.selector}: they join "
                 f"wave {rollout.wave + 1}",
                 {"devices": joining[:200], "wave": rollout.wave + 1,
                  **({"in_another_rollout": sorted(busy)[:200]} if busy else {})})
    return joining


def _protected_groups_of(session: Session, targets: list[str]) -> list[str]:
    """The protected groups any of the targets belongs to."""
    groups = session.exec(select(ProtectedGroup)).all()
    if not groups:
        return []
    rows = session.exec(select(Device).where(col(Device.id).in_(targets))).all()
    labels = [effective_labels(d.labels, d.tags) for d in rows]
    return sorted(g.name for g in groups
                  if any(Selector.parse(g.selector).matches(each) for each in labels))


def protect_group(session: Session, name: str, selector: str, actor: str) -> ProtectedGroup:
    """Mark a selector's devices as protected: rollouts to them wait for a second person."""
    group = ProtectedGroup(name=name, selector=str(Selector.parse(selector)), created_by=actor)
    audit.lock_chain(session)
    session.merge(group)
    audit.record(session, actor, "group.protect", f"group:{name}",
                 f"rollouts to {group.selector} need a second person's approval",
                 {"selector": group.selector})
    session.commit()
    return group


def approve(session: Session, rollout_id: str, actor: str, person: str) -> Rollout:
    """Start a rollout that awaits approval. ``person`` is who approves (a token's name):
    never the rollout's creator."""
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    if rollout.status != RolloutStatus.AWAITING_APPROVAL.value:
        raise RolloutStateError(f"rollout {rollout_id} is {rollout.status}: nothing to approve")
    creator = rollout.created_by.split(":", 2)[-1]
    if person == creator or actor == rollout.created_by:
        raise ApprovalError(f"rollout {rollout_id} was created by {creator!r}: a second "
                            "person must approve it")
    audit.lock_chain(session)
    rollout.status, rollout.wave_started_at, rollout.reason = (
        RolloutStatus.RUNNING.value, utcnow(), None)
    session.add(rollout)
    audit.record(session, actor, "rollout.approve", f"rollout:{rollout_id}",
                 f"approved by {person}", {"creator": rollout.created_by})
    session.commit()
    session.refresh(rollout)
    return rollout


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return rollout


_VERBS = {RolloutStatus.PAUSED: "pause", RolloutStatus.RUNNING: "resume",
          RolloutStatus.ABORTED: "abort"}
_ALLOWED_FROM = {
    RolloutStatus.PAUSED: {RolloutStatus.RUNNING.value},
    RolloutStatus.RUNNING: {RolloutStatus.PAUSED.value},
    RolloutStatus.ABORTED: set(ACTIVE),
}


def set_status(session: Session, rollout_id: str, status: RolloutStatus, actor: str,
               reason: str) -> Rollout:
    """An operator's pause, resume or abort, checked against the current status first."""
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    verb = _VERBS[status]
    if rollout.status not in _ALLOWED_FROM[status]:
        raise RolloutStateError(f"rollout {rollout_id} is {rollout.status}: cannot {verb} it")
    audit.lock_chain(session)
    rollout.status = status.value
    if status is RolloutStatus.RUNNING and rollout.wave_started_at is None:
        rollout.wave_started_at = utcnow()  # created paused: its first wave starts now
    if status is RolloutStatus.ABORTED:
        rollout.finished_at, rollout.reason = utcnow(), reason
    session.add(rollout)
    audit.record(session, actor, f"rollout.{verb}", f"rollout:{rollout_id}", reason,
                 {"status": status.value})
    session.commit()
    session.refresh(rollout)
    return rollout


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _restarted(row: RolloutDevice, beat: dict) -> bool:
    uptime = beat.get("uptime_s")
    return (row.uptime_at_notify is not None and isinstance(uptime, int | float)
            and uptime < row.uptime_at_notify)


def _silent_offline(device: Device, now: datetime, grace_s: float) -> bool:
    if device.online:
        return False
    last = _aware(device.last_seen)
    return last is None or (now - last).total_seconds() >= grace_s


def _output_drift(session: Session, rollout: Rollout, row: RolloutDevice,
                  min_rows: int) -> tuple[float | None, str | None]:
    """The device's outputs on the rollout's version against its previous version's (the
    day before its install): see ``fleet.drift.compare``."""
    if (row.prev_bundle_version is None or row.prev_bundle_name != rollout.bundle_name
            or row.prev_bundle_version == rollout.bundle_version):
        return None, None
    name, notified = rollout.bundle_name, _aware(row.notified_at)
    since = notified - timedelta(days=1) if notified is not None else None
    return output_shift(
        drift_store.output_counts(session, row.device_id, name, row.prev_bundle_version,
                                  since=since),
        drift_store.output_edges(session, name, row.prev_bundle_version),
        drift_store.output_counts(session, row.device_id, name, rollout.bundle_version,
                                  since=notified),
        drift_store.output_edges(session, name, rollout.bundle_version),
        min_rows,
    )


def _figures(row: RolloutDevice, device: Device | None, now: datetime,
             policy: GatePolicy, drift: tuple[float | None, str | None] = (None, None),
             ) -> DeviceFigures | None:
    state = DeviceState(row.state)
    if state in (DeviceState.PENDING, DeviceState.STUCK) or device is None:
        return None
    beat = device.heartbeat or {}
    return DeviceFigures(
        device_id=row.device_id,
        installed=state is DeviceState.HEALTHY,
        failed=state is DeviceState.FAILED,
        inferences=max(0, int(beat.get("inference_count", 0)) - row.inferences_at_install),
        model_errors=max(0, int(beat.get("error_count", 0)) - row.model_errors_at_install),
        client_errors=max(0, int(beat.get("client_error_count", 0))
                          - row.client_errors_at_install),
        latency_p95_before=row.latency_p95_before,
        latency_p95_after=beat.get("latency_ms_p95") if state is DeviceState.HEALTHY
        else None,
        went_offline=_restarted(row, beat)
        or _silent_offline(device, now, policy.offline_grace_s),
        output_drift=drift[0],
        output_drift_feature=drift[1],
    )


def load_view(session: Session, rollout: Rollout, now: datetime | None = None) -> RolloutView:
    now = now or utcnow()
    policy = policy_from_dict(rollout.policy)
    rows = session.exec(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id)).all()
    by_id = {d.id: d for d in session.exec(select(Device).where(
        col(Device.id).in_([r.device_id for r in rows if r.wave == rollout.wave])))}
    drift: dict[str, tuple[float | None, str | None]] = {}
    if policy.gates.max_output_drift is not None:
        drift = {r.device_id: _output_drift(session, rollout, r, DEFAULT_MIN_ROWS)
                 for r in rows if r.wave == rollout.wave and r.state == DeviceState.HEALTHY}
    views = [DeviceView(r.device_id, r.wave, DeviceState(r.state), _aware(r.notified_at),
                        r.redrives, _figures(r, by_id.get(r.device_id), now, policy.gates,
                                             drift.get(r.device_id, (None, None))))
             for r in rows]
    minute_ago = now - timedelta(minutes=1)
    recent = sum(1 for v in views if v.notified_at is not None and v.notified_at >= minute_ago)
    return RolloutView(rollout.id, RolloutStatus(rollout.status), policy, rollout.wave,
                       _aware(rollout.wave_started_at), views, notified_last_minute=recent)


def active_rollout_of(session: Session, device_id: str) -> tuple[Rollout, RolloutDevice] | None:
    found = session.exec(
        select(Rollout, RolloutDevice)
        .join(RolloutDevice, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(RolloutDevice.device_id == device_id)
        .where(col(Rollout.status).in_(ACTIVE))
    ).first()
    return (found[0], found[1]) if found else None


def on_event(session: Session, message: EventMessage) -> None:
    """Move the device along in its active rollout, if the event is about that rollout's
    bundle. A transition the machine does not allow (a late or replayed event) is ignored
    and logged: the stored state never goes backwards."""
    state = state_for_event(message.event, message.detail)
    if state is None:
        return
    found = active_rollout_of(session, message.device_id)
    if found is None:
        return
    rollout, row = found
    about = message.detail.get("from") if state is DeviceState.ROLLED_BACK else (
        message.detail.get("bundle"))
    if not isinstance(about, dict) or (about.get("name"), about.get("version")) != (
            rollout.bundle_name, rollout.bundle_version):
        return
    if row.state == DeviceState.PENDING.value:
        return  # not notified by this rollout: an operator's own deployment
    if row.state == state.value:
        return  # already there: a download's progress events repeat `downloading`
    try:
        row.state = transition(DeviceState(row.state), state).value
    except TransitionError as exc:
        log.info("rollout %s, device %s: %s (event %s ignored)", rollout.id,
                 message.device_id, exc, message.event)
        return
    if state is DeviceState.ROLLED_BACK:
        row.rolled_back_by_device = True
    session.add(row)
