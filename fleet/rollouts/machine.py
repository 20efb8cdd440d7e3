"""The rollout state machine: pure decisions, no IO.

A controller (with the database, the broker and the audit log) reads a rollout's stored
state into a :class:`RolloutView`, asks :func:`decide` what to do now, carries the actions
out and stores the result. Everything that decides lives here, so it can be tested without
a broker, replayed from stored state after a crash, and reasoned about in one place:

* a device moves only along :data:`TRANSITIONS` (checked: a late or replayed event that
  would move it backwards is refused, not applied);
* a wave is notified device by device (within the rate limit); a device that makes no
  progress within ``stuck_timeout_s`` of its notification is re-driven, at most
  ``max_redrives`` times, then marked ``stuck``: stuck devices count as settled, so they
  never hold a rollout beyond its policy;
* the gates judge the current wave (:mod:`fleet.rollouts.gates`): a failing gate halts the
  rollout at once, and by default rolls the wave's updated devices back to their previous
  bundle (``roll_back_scope="all"``: earlier waves' too, which passed their gates but ran
  the bundle that has now shown itself bad); a wave advances only when all its devices
  have settled, every gate passes and its bake time is over. Devices outside the current
  and earlier waves are never notified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from fleet.errors import FleetError
from fleet.rollouts.gates import (
    DEFAULT_GATES,
    DeviceFigures,
    Gate,
    GatePolicy,
    GateResult,
    Verdict,
    evaluate,
)
from fleet.rollouts.waves import DEFAULT_WAVES, WaveSpec

__all__ = [
    "FINAL_REASONS",
    "ROLL_BACK_ALL",
    "ROLL_BACK_SCOPES",
    "ROLL_BACK_WAVE",
    "SETTLED",
    "TRANSITIONS",
    "Advance",
    "Complete",
    "DeviceState",
    "DeviceView",
    "Halt",
    "MarkStuck",
    "Notify",
    "Policy",
    "Redrive",
    "RollBack",
    "RolloutStatus",
    "RolloutView",
    "TransitionError",
    "decide",
    "state_for_event",
    "transition",
]


ROLL_BACK_WAVE, ROLL_BACK_ALL = "wave", "all"
ROLL_BACK_SCOPES = (ROLL_BACK_WAVE, ROLL_BACK_ALL)


class DeviceState(StrEnum):
    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    STUCK = "stuck"


class RolloutStatus(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"


_S = DeviceState
# Where a device may go from each state. A device may skip steps (a bundle still complete
# in its other slot installs without a download); it never goes back, except a re-drive
# (stuck or silent -> notified) and a rollback.
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    _S.PENDING: frozenset({_S.NOTIFIED}),
    _S.NOTIFIED: frozenset({_S.NOTIFIED, _S.DOWNLOADING, _S.INSTALLED, _S.HEALTHY, _S.FAILED,
                            _S.STUCK, _S.ROLLED_BACK}),
    _S.DOWNLOADING: frozenset({_S.NOTIFIED, _S.INSTALLED, _S.HEALTHY, _S.FAILED, _S.STUCK,
                               _S.ROLLED_BACK}),
    _S.INSTALLED: frozenset({_S.NOTIFIED, _S.HEALTHY, _S.FAILED, _S.STUCK, _S.ROLLED_BACK}),
    _S.HEALTHY: frozenset({_S.ROLLED_BACK}),
    _S.FAILED: frozenset({_S.ROLLED_BACK}),
    _S.STUCK: frozenset({_S.NOTIFIED, _S.DOWNLOADING, _S.INSTALLED, _S.HEALTHY, _S.FAILED,
                         _S.ROLLED_BACK}),
    _S.ROLLED_BACK: frozenset(),
}
# A device in one of these has an outcome for its wave.
SETTLED = frozenset({_S.HEALTHY, _S.FAILED, _S.ROLLED_BACK, _S.STUCK})
_PROGRESSING = frozenset({_S.NOTIFIED, _S.DOWNLOADING, _S.INSTALLED})

# The agent's events (agent/daemon.py) and the state each one means.
_EVENT_STATES = {
    "desired_received": _S.DOWNLOADING,
    "downloading": _S.DOWNLOADING,
    "verified": _S.INSTALLED,
    "installed": _S.INSTALLED,
    "healthy": _S.HEALTHY,
    "failed": _S.FAILED,
    "rolled_back": _S.ROLLED_BACK,
}


class TransitionError(FleetError):
    reason = "invalid_transition"


def transition(current: DeviceState, new: DeviceState) -> DeviceState:
    """``new`` if a device may go there from ``current``; else TransitionError."""
    if new not in TRANSITIONS[current]:
        raise TransitionError(f"a device cannot go from {current.value} to {new.value}")
    return new


# Failures the same bytes would repeat (agents before ``final`` was sent name only these).
FINAL_REASONS = frozenset({"health_check_failed", "hash_mismatch", "too_large",
                           "unsafe_archive", "bad_manifest"})


def state_for_event(event: str, detail: dict | None = None) -> DeviceState | None:
    """The deployment state an agent event means (None: an event that moves nothing). A
    failure the agent will retry (a dropped download) is not a failed install: the device
    is still on its way."""
    state = _EVENT_STATES.get(event)
    if state is _S.FAILED:
        detail = detail or {}
        final = detail.get("final")
        if not isinstance(final, bool):
            final = detail.get("reason") in FINAL_REASONS
        return _S.FAILED if final else _S.DOWNLOADING
    return state


@dataclass(frozen=True)
class Policy:
    waves: tuple[WaveSpec, ...] = DEFAULT_WAVES
    bake_s: float = 300.0
    gates: GatePolicy = field(default_factory=GatePolicy)
    roll_back_on_failure: bool = True
    roll_back_scope: str = "wave"  # or "all": every device the rollout updated
    stuck_timeout_s: float = 600.0
    max_redrives: int = 2
    notify_per_minute: int | None = None  # None: a whole wave at once


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    wave: int
    state: DeviceState
    notified_at: datetime | None = None
    redrives: int = 0
    figures: DeviceFigures | None = None


@dataclass(frozen=True)
class RolloutView:
    rollout_id: str
    status: RolloutStatus
    policy: Policy
    wave: int  # the wave in progress
    wave_started_at: datetime | None
    devices: Sequence[DeviceView]
    notified_last_minute: int = 0  # for the rate limit


# The actions decide() asks for; the controller carries them out and records them.
@dataclass(frozen=True)
class Notify:
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class Redrive:
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class MarkStuck:
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class Advance:
    to_wave: int
    gates: tuple[GateResult, ...]


@dataclass(frozen=True)
class Complete:
    gates: tuple[GateResult, ...]


@dataclass(frozen=True)
class Halt:
    reason: str
    gates: tuple[GateResult, ...]


@dataclass(frozen=True)
class RollBack:
    device_ids: tuple[str, ...]


Action = Notify | Redrive | MarkStuck | Advance | Complete | Halt | RollBack


def decide(
    view: RolloutView, now: datetime, gates: Sequence[Gate] = DEFAULT_GATES
) -> list[Action]:
    """What to do now, in order. Nothing unless the rollout is running."""
    if view.status is not RolloutStatus.RUNNING:
        return []
    policy = view.policy
    wave = [d for d in view.devices if d.wave == view.wave]
    actions: list[Action] = []
    if not wave:  # a share of few devices can leave a wave empty: nothing to judge
        last = view.wave + 1 >= len(policy.waves)
        return [Complete(()) if last else Advance(view.wave + 1, ())]

    verdict, results = evaluate(
        [d.figures for d in wave if d.figures is not None], policy.gates, gates,
        bake_over=_bake_over(view, now),
    )
    if verdict is Verdict.FAIL:
        failed = ", ".join(r.gate for r in results if r.verdict is Verdict.FAIL)
        actions.append(Halt(f"wave {view.wave + 1} failed its gates: {failed}", tuple(results)))
        if policy.roll_back_on_failure:
            reach = (range(view.wave + 1) if policy.roll_back_scope == ROLL_BACK_ALL
                     else (view.wave,))
            updated = tuple(d.device_id for d in view.devices
                            if d.wave in reach
                            and d.state in (_S.HEALTHY, _S.INSTALLED, _S.DOWNLOADING,
                                            _S.NOTIFIED))
            if updated:
                actions.append(RollBack(updated))
        return actions

    pending = [d.device_id for d in wave if d.state is _S.PENDING]
    budget = len(pending)
    if policy.notify_per_minute is not None:
        budget = max(0, policy.notify_per_minute - view.notified_last_minute)
    if pending and budget:
        actions.append(Notify(tuple(pending[:budget])))

    silent = [d for d in wave if d.state in _PROGRESSING and d.notified_at is not None
              and now - d.notified_at >= timedelta(seconds=policy.stuck_timeout_s)]
    redrive = tuple(d.device_id for d in silent if d.redrives < policy.max_redrives)
    stuck = tuple(d.device_id for d in silent if d.redrives >= policy.max_redrives)
    if redrive:
        actions.append(Redrive(redrive))
    if stuck:
        actions.append(MarkStuck(stuck))

    settled = all(d.state in SETTLED or d.device_id in stuck for d in wave)
    if settled and verdict is Verdict.PASS and _bake_over(view, now):
        if view.wave + 1 >= len(policy.waves):
            actions.append(Complete(tuple(results)))
        else:
            actions.append(Advance(view.wave + 1, tuple(results)))
    return actions


def _bake_over(view: RolloutView, now: datetime) -> bool:
    if view.wave_started_at is None:
        return False
    return now - view.wave_started_at >= timedelta(seconds=view.policy.bake_s)
