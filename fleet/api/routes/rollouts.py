"""Staged rollouts over REST: create, list, show (waves, device states, each gate's current
value against its threshold), pause, resume, abort. Viewers read; operators act."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field, field_validator
from sqlmodel import Session, col, select

from agent.contract import BundleRef
from fleet import audit
from fleet.api.deps import ERROR_RESPONSES, AdminToken, CurrentToken, OperatorToken, SessionDep
from fleet.models import DeviceIdField, ProtectedGroup, Rollout, RolloutDevice
from fleet.rollouts import store
from fleet.rollouts.gates import GatePolicy, evaluate
from fleet.rollouts.machine import Policy, RolloutStatus
from fleet.rollouts.waves import parse_waves

router = APIRouter(prefix="/rollouts", tags=["rollouts"], responses=ERROR_RESPONSES)
groups_router = APIRouter(prefix="/groups", tags=["rollouts"], responses=ERROR_RESPONSES)


class RolloutCreate(BaseModel):
    bundle: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    version: int = Field(ge=0, lt=2**31)
    selector: str | None = Field(default=None, max_length=1024,
                                 description="devices whose labels/tags match, e.g. site=berlin")
    devices: list[DeviceIdField] | None = Field(default=None, min_length=1, max_length=10_000)
    waves: str = Field(default="1,10%,50%,100%", max_length=200,
                       description="cumulative wave sizes: counts or shares")
    bake_s: float = Field(default=300, ge=0, le=7 * 86_400)
    max_install_failure_rate: float = Field(default=0.1, ge=0, le=1)
    max_model_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_latency_ratio: float = Field(default=1.5, gt=0, le=100)
    max_offline_rate: float = Field(default=0.2, ge=0, le=1)
    offline_grace_s: float = Field(default=60, ge=0, le=86_400,
                                   description="offline this long before it counts")
    min_devices: int = Field(default=1, ge=1, le=10_000)
    min_inferences: int = Field(default=20, ge=0, le=10**9)
    max_output_drift: float | None = Field(
        default=None, gt=0, le=1, description="halt when the new version's outputs are "
        "further than this (median JS distance) from the previous version's on the same "
        "devices; off by default")
    roll_back_on_failure: bool = True
    roll_back_scope: Literal["wave", "all"] = Field(
        default="wave", description="on a failed gate, roll back the failing wave's "
        "updated devices, or every device the rollout updated")
    stuck_timeout_s: float = Field(default=600, gt=0, le=7 * 86_400)
    max_redrives: int = Field(default=2, ge=0, le=20)
    notify_per_minute: int | None = Field(default=None, ge=1, le=10**6)
    paused: bool = Field(default=False, description="created paused: starts on resume")

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: str) -> str:
        parse_waves(value)  # ValueError -> a 422 naming the field
        return value

    def policy(self) -> Policy:
        return Policy(
            waves=parse_waves(self.waves), bake_s=self.bake_s,
            gates=GatePolicy(
                max_install_failure_rate=self.max_install_failure_rate,
                max_model_error_rate=self.max_model_error_rate,
                max_latency_ratio=self.max_latency_ratio,
                max_offline_rate=self.max_offline_rate,
                offline_grace_s=self.offline_grace_s,
                min_devices=self.min_devices, min_inferences=self.min_inferences,
                max_output_drift=self.max_output_drift),
            roll_back_on_failure=self.roll_back_on_failure,
            roll_back_scope=self.roll_back_scope,
            stuck_timeout_s=self.stuck_timeout_s, max_redrives=self.max_redrives,
            notify_per_minute=self.notify_per_minute,
        )


class WavePublic(BaseModel):
    wave: int
    devices: int
    states: dict[str, int]


class GatePublic(BaseModel):
    gate: str
    verdict: str
    value: float | None
    threshold: float
    devices: int
    detail: str


class RolloutPublic(BaseModel):
    id: str
    bundle: str
    version: int
    selector: str | None
    status: str
    wave: int  # 1-based, the wave in progress (or where it ended)
    waves: list[WavePublic]
    gates: list[GatePublic]  # the current wave, now
    policy: dict
    created_by: str
    created_at: datetime
    reason: str | None
    finished_at: datetime | None


class StatusChange(BaseModel):
    reason: str = Field(default="", max_length=500)


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _public(session: Session, rollout: Rollout) -> RolloutPublic:
    rows = session.exec(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id)).all()
    per_wave: dict[int, Counter[str]] = {}
    for row in rows:
        per_wave.setdefault(row.wave, Counter())[row.state] += 1
    view = store.load_view(session, rollout)
    figures = [d.figures for d in view.devices if d.wave == view.wave and d.figures]
    _, results = evaluate(figures, view.policy.gates)
    return RolloutPublic(
        id=rollout.id, bundle=rollout.bundle_name, version=rollout.bundle_version,
        selector=rollout.selector, status=rollout.status, wave=rollout.wave + 1,
        waves=[WavePublic(wave=w + 1, devices=sum(c.values()), states=dict(c))
               for w, c in sorted(per_wave.items())],
        gates=[GatePublic(gate=r.gate, verdict=r.verdict.value, value=r.value,
                          threshold=r.threshold, devices=r.devices, detail=r.detail)
               for r in results],
        policy=rollout.policy, created_by=rollout.created_by,
        created_at=_utc(rollout.created_at), reason=rollout.reason,
        finished_at=_utc(rollout.finished_at),
    )


@router.post("", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED)
def create(body: RolloutCreate, session: SessionDep, token: OperatorToken) -> RolloutPublic:
    """Start a staged rollout of a published bundle to a selector's devices (or listed
    ids): waves, bake time, health gates; halted and rolled back by default on a failing
    gate."""
    rollout = store.create_rollout(
        session, BundleRef(name=body.bundle, version=body.version), body.policy(),
        audit.token_actor(token), selector=body.selector, device_ids=body.devices,
        paused=body.paused)
    return _public(session, rollout)


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(
    session: SessionDep, _: CurrentToken, limit: int = Query(default=50, ge=1, le=500),
) -> list[RolloutPublic]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit))
    return [_public(session, rollout) for rollout in rows]


@router.get("/{rollout_id}", response_model=RolloutPublic)
def show(rollout_id: str, session: SessionDep, _: CurrentToken) -> RolloutPublic:
    return _public(session, store.get_rollout(session, rollout_id))


def _change(rollout_id: str, new: RolloutStatus, body: StatusChange | None,
            session: Session, token) -> RolloutPublic:
    reason = (body.reason if body else "") or f"by {token.name}"
    rollout = store.set_status(session, rollout_id, new, audit.token_actor(token), reason)
    return _public(session, rollout)


class RolloutDevicePublic(BaseModel):
    device_id: str
    wave: int  # 1-based
    state: str
    notified_at: datetime | None
    redrives: int
    rolled_back_by_device: bool
    previous: str | None  # the bundle it ran before (name:version), where a rollback goes


@router.get("/{rollout_id}/devices", response_model=list[RolloutDevicePublic])
def rollout_devices(
    rollout_id: str, session: SessionDep, _: CurrentToken,
    wave: int | None = Query(default=None, ge=1, le=20, description="only this wave"),
    state: str | None = Query(default=None, max_length=32, description="only this state"),
) -> list[RolloutDevicePublic]:
    """Each targeted device: its wave and where it is in its deployment."""
    store.get_rollout(session, rollout_id)
    query = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
    if wave is not None:
        query = query.where(RolloutDevice.wave == wave - 1)
    if state is not None:
        query = query.where(RolloutDevice.state == state)
    rows = session.exec(query.order_by(col(RolloutDevice.wave), col(RolloutDevice.device_id)))
    return [RolloutDevicePublic(
        device_id=r.device_id, wave=r.wave + 1, state=r.state,
        notified_at=_utc(r.notified_at), redrives=r.redrives,
        rolled_back_by_device=r.rolled_back_by_device,
        previous=(f"{r.prev_bundle_name}:{r.prev_bundle_version}"
                  if r.prev_bundle_name is not None else None)) for r in rows]


@router.post("/{rollout_id}/pause", response_model=RolloutPublic)
def pause(rollout_id: str, session: SessionDep, token: OperatorToken,
          body: StatusChange | None = None) -> RolloutPublic:
    return _change(rollout_id, RolloutStatus.PAUSED, body, session, token)


@router.post("/{rollout_id}/resume", response_model=RolloutPublic)
def resume(rollout_id: str, session: SessionDep, token: OperatorToken,
           body: StatusChange | None = None) -> RolloutPublic:
    return _change(rollout_id, RolloutStatus.RUNNING, body, session, token)


@router.post("/{rollout_id}/abort", response_model=RolloutPublic)
def abort(rollout_id: str, session: SessionDep, token: OperatorToken,
          body: StatusChange | None = None) -> RolloutPublic:
    return _change(rollout_id, RolloutStatus.ABORTED, body, session, token)


@router.post("/{rollout_id}/approve", response_model=RolloutPublic)
def approve(rollout_id: str, session: SessionDep, token: OperatorToken) -> RolloutPublic:
    """Start a rollout that reaches a protected group: a second person's token (another
    name than the creator's) approves it."""
    rollout = store.approve(session, rollout_id, audit.token_actor(token), token.name)
    return _public(session, rollout)


class GroupProtect(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    selector: str = Field(max_length=1024)


class GroupPublic(BaseModel):
    name: str
    selector: str
    created_by: str


@groups_router.post("/protected", response_model=GroupPublic, status_code=201)
def protect(body: GroupProtect, session: SessionDep, token: AdminToken) -> GroupPublic:
    """Protect a selector's devices: a rollout reaching any of them waits for approval."""
    group = store.protect_group(session, body.name, body.selector, audit.token_actor(token))
    return GroupPublic(name=group.name, selector=group.selector, created_by=group.created_by)


@groups_router.get("/protected", response_model=list[GroupPublic])
def protected(session: SessionDep, _: CurrentToken) -> list[GroupPublic]:
    return [GroupPublic(name=g.name, selector=g.selector, created_by=g.created_by)
            for g in session.exec(select(ProtectedGroup).order_by(ProtectedGroup.name))]
