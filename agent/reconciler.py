"""One owner of the model slots: installs, rollbacks and disk checks, as commands on one
thread.

Why: the slots are a small state machine on disk (``current``, its ``current.new`` during a
switch, the inactive slot being staged). Two threads driving it at once (the install
worker switching while the main loop's check recovers a stray ``current.new``) could unlink
the link being switched, fail an install with a spurious ``io_error``, or load a model
twice. So in the daemon only the reconciler's thread touches the slots; another process
(``edge-agent rollback``) either asks the daemon over its control socket
(:mod:`agent.control`) or, when no daemon runs, holds the slots' lock file itself
(:meth:`agent.slots.Slots.try_lock`, which the daemon holds for its whole life).

Other threads only *post*: a newer desired state was accepted (:meth:`desired_changed`),
a rollback is asked for (:meth:`request_rollback`), check the disk (:meth:`follow_disk`).
A command that makes the install in progress pointless cancels it first
(:class:`agent.cancel.Cancel`), so a stuck download never holds back a newer desired
state, a rollback, or a clean stop.

Decisions are pure functions of plain facts (:func:`next_step`, :func:`after_install`,
:func:`should_preempt`, :func:`plan_rollback`); the thread gathers the facts, asks, and
does the IO the answer names.

Rollback: switches to the other slot and records where it came from
(:class:`RollbackRecord`, in the agent state). A second rollback in a row would switch
back to the newer model, i.e. go forward: it is refused until an install succeeds (which
clears the record). The record also says whether the fleet was told: a rollback made while
no daemon ran is reported as ``rolled_back`` when the daemon starts.
"""

from __future__ import annotations

import enum
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from agent.cancel import Cancel
from agent.contract import BundleRef, DesiredState, to_data
from agent.errors import CancelledError, InstallError, RollbackRefusedError, UpdateError
from agent.installer import Installer, LoadedModel
from agent.state import AgentState

__all__ = [
    "Idle",
    "Install",
    "Outcome",
    "Reconciler",
    "RollbackRecord",
    "RollbackTo",
    "Settle",
    "SlotFacts",
    "after_install",
    "next_step",
    "plan_rollback",
    "should_preempt",
]

log = logging.getLogger(__name__)

EventSink = Callable[..., None]


def _label(ref: BundleRef) -> str:
    return f"{ref.name} v{ref.version}"


# ----------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Idle:
    """Nothing to do: the accepted desired state is applied (done, or failed for good)."""


@dataclass(frozen=True)
class Settle:
    """A desired state that names no bundle: nothing to install, mark it applied."""

    generation: int


@dataclass(frozen=True)
class Install:
    generation: int
    bundle: BundleRef


def next_step(desired: DesiredState | None, applied_generation: int) -> Idle | Settle | Install:
    if desired is None or desired.generation <= applied_generation:
        return Idle()
    if desired.bundle is None:
        return Settle(desired.generation)
    return Install(desired.generation, desired.bundle)


class Outcome(enum.Enum):
    APPLIED = "applied"  # installed, or failed in a way the same bytes would repeat
    RETRY = "retry"  # failed in a way that may pass later: try again after a backoff
    CANCELLED = "cancelled"  # a newer desired state, a rollback or a stop came first


def after_install(error: UpdateError | None) -> Outcome:
    if error is None:
        return Outcome.APPLIED
    if isinstance(error, CancelledError):
        return Outcome.CANCELLED
    return Outcome.APPLIED if error.final else Outcome.RETRY


def should_preempt(running: Install, desired: DesiredState) -> bool:
    """A newer desired state naming another bundle makes the running install pointless;
    the same bundle again lets it finish (then the newer generation is applied at once)."""
    return desired.generation > running.generation and desired.bundle != running.bundle


@dataclass(frozen=True)
class SlotFacts:
    active: str | None
    active_ref: BundleRef | None
    other: str
    other_ref: BundleRef | None  # None: no complete install there


@dataclass(frozen=True)
class RollbackRecord:
    from_ref: BundleRef
    to_ref: BundleRef
    slot: str
    reported: bool = False  # the fleet has been sent the rolled_back event

    def to_json(self) -> str:
        return json.dumps({
            "from": to_data(self.from_ref), "to": to_data(self.to_ref), "slot": self.slot,
            "reported": self.reported,
        })

    @classmethod
    def from_json(cls, raw: str) -> RollbackRecord:
        data = json.loads(raw)
        return cls(BundleRef(**data["from"]), BundleRef(**data["to"]), data["slot"],
                   data["reported"])

    def event_detail(self) -> dict:
        return {"from": to_data(self.from_ref), "to": to_data(self.to_ref), "slot": self.slot,
                "by": "edge-agent rollback"}


@dataclass(frozen=True)
class RollbackTo:
    slot: str
    from_ref: BundleRef
    to_ref: BundleRef


def plan_rollback(facts: SlotFacts, last: RollbackRecord | None) -> RollbackTo:
    """Where a rollback goes, or :class:`RollbackRefusedError` saying why it must not."""
    if facts.active is None or facts.active_ref is None:
        raise RollbackRefusedError("no model is active: nothing to roll back from")
    if facts.other_ref is None:
        raise RollbackRefusedError(
            f"no previous model to roll back to: slot {facts.other} holds no complete install"
        )
    if last is not None and last.to_ref == facts.active_ref and last.from_ref == facts.other_ref:
        raise RollbackRefusedError(
            f"already rolled back from {_label(last.from_ref)} to {_label(last.to_ref)}; "
            f"rolling back again would go forward to {_label(last.from_ref)}: deploy it "
            "from the fleet instead"
        )
    return RollbackTo(facts.other, facts.active_ref, facts.other_ref)


# ------------------------------------------------------------------ the IO around them

_RECONCILE = "reconcile"
_FOLLOW_DISK = "follow_disk"
_STOP = "stop"
ROLLBACK_KEY = "rollback"


@dataclass
class _Rollback:
    reply: Future[RollbackRecord]


class Reconciler:
    def __init__(
        self,
        state: AgentState,
        installer: Installer,
        *,
        emit: EventSink | None,
        current: Callable[[], LoadedModel | None],
        on_swap: Callable[[LoadedModel], None],
        retry_initial_s: float = 5.0,
        retry_max_s: float = 600.0,
    ) -> None:
        self.state = state
        self.installer = installer
        self._emit = emit  # None: no daemon (the CLI); events wait for the daemon's start
        self._current = current
        self._on_swap = on_swap
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.retry_at: float | None = None  # monotonic time of the next try, if one is due
        self._retry_delay = retry_initial_s
        self._commands: queue.Queue[str | _Rollback] = queue.Queue()
        self._lock = threading.Lock()  # guards the fields below, shared with posters
        self._running: tuple[Install, Cancel] | None = None
        self._latest: DesiredState | None = None
        self._rollbacks_waiting = 0
        self._follow_posted = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    # ---------------------------------------------------------- posted by other threads

    def desired_changed(self, desired: DesiredState) -> None:
        """A newer desired state was accepted: act on it, cancelling what it supersedes."""
        with self._lock:
            self._latest = desired
            self._retry_delay = self.retry_initial_s
            if self._running is not None and should_preempt(self._running[0], desired):
                self._running[1].cancel(f"superseded by generation {desired.generation}")
        self._commands.put(_RECONCILE)

    def request_rollback(self) -> Future[RollbackRecord]:
        """Roll back on the reconciler's thread (cancelling any install in progress)."""
        reply: Future[RollbackRecord] = Future()
        with self._lock:
            if self._stopping:
                reply.set_exception(InstallError("the agent is stopping"))
                return reply
            self._rollbacks_waiting += 1
            if self._running is not None:
                self._running[1].cancel("rollback requested on the device")
        self._commands.put(_Rollback(reply))
        return reply

    def follow_disk(self) -> None:
        """Serve what ``current`` points at, should anything have switched it on disk."""
        with self._lock:
            if self._follow_posted:
                return
            self._follow_posted = True
        self._commands.put(_FOLLOW_DISK)

    def start(self) -> None:
        self._commands.put(_RECONCILE)  # whatever was left undone before a restart
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        with self._lock:
            self._stopping = True
            if self._running is not None:
                self._running[1].cancel("the agent is stopping")
        self._commands.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        self._report_rollback()  # one made while no daemon ran
        while True:
            timeout = None if self.retry_at is None else max(self.retry_at - time.monotonic(), 0)
            try:
                command = self._commands.get(timeout=timeout)
            except queue.Empty:
                command = _RECONCILE  # a retry is due
            if command == _STOP:
                break
            try:
                self._handle(command)
            except Exception:  # the owner of the slots must outlive any bug
                log.exception("reconciler: %s failed", command)
                self._schedule_retry()
        while True:  # answer whoever still waits
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Rollback):
                command.reply.set_exception(InstallError("the agent is stopping"))

    def _handle(self, command: str | _Rollback) -> None:
        if isinstance(command, _Rollback):
            with self._lock:
                self._rollbacks_waiting -= 1
            try:
                command.reply.set_result(self.rollback())
                return
            except UpdateError as exc:
                command.reply.set_exception(exc)
            except Exception as exc:
                log.exception("rollback failed")
                command.reply.set_exception(InstallError(f"unexpected {type(exc).__name__}: "
                                                         f"{exc}"))
            self._commands.put(_RECONCILE)  # resume an install the request cancelled
        elif command == _FOLLOW_DISK:
            with self._lock:
                self._follow_posted = False
            self._follow_disk()
        else:
            self._reconcile()

    def _reconcile(self) -> None:
        step = next_step(self.state.desired(), self.state.applied_generation)
        if isinstance(step, Idle):
            self.retry_at = None
            return
        if isinstance(step, Settle):
            self.state.mark_applied(step.generation)
            self.retry_at = None
            return
        cancel = Cancel()
        with self._lock:
            self._running = (step, cancel)
            # Posted between reading the desired state and here: cancel at once.
            if self._stopping:
                cancel.cancel("the agent is stopping")
            elif self._rollbacks_waiting:
                cancel.cancel("rollback requested on the device")
            elif self._latest is not None and should_preempt(step, self._latest):
                cancel.cancel(f"superseded by generation {self._latest.generation}")
        current = self._current()
        try:
            installed = self.installer.install(step.bundle, current, cancel)
        finally:
            with self._lock:
                self._running = None
        if installed is not None and installed is not current:
            self._set_rollback_record(None)  # a new install: rolling back is allowed again
            self._on_swap(installed)
        outcome = after_install(None if installed is not None else self.installer.last_error)
        if outcome is Outcome.APPLIED:
            self.state.mark_applied(step.generation)
            self.retry_at = None
            self._retry_delay = self.retry_initial_s
        elif outcome is Outcome.RETRY:
            self._schedule_retry()
        else:  # the command that cancelled it is next in the queue
            self.retry_at = None

    def _schedule_retry(self) -> None:
        log.info("will retry the install in %.0fs", self._retry_delay)
        self.retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)

    def _follow_disk(self) -> None:
        active = self.installer.slots.active()
        current = self._current()
        if active is None or (current is not None and current.slot == active):
            return
        loaded = self.installer.load_active()
        if loaded is not None:
            log.info("slot switched on disk: now serving %s", _label(loaded.manifest.ref))
            self._on_swap(loaded)

    # ------------------------------------------------------------------ rollback

    def rollback(self) -> RollbackRecord:
        """Switch to the other slot: on the reconciler's thread, or in a process that holds
        the slots' lock (``edge-agent rollback`` with no daemon running)."""
        slots = self.installer.slots
        slots.recover()
        active = slots.active()
        other = slots.inactive()
        facts = SlotFacts(
            active=active,
            active_ref=self.installer.slot_ref(active) if active else None,
            other=other,
            other_ref=self.installer.slot_ref(other),
        )
        plan = plan_rollback(facts, self._rollback_record())
        loaded = self.installer.switch_to(plan.slot)
        record = RollbackRecord(plan.from_ref, plan.to_ref, plan.slot)
        self._set_rollback_record(record)
        # The device's operator overrides the fleet's desired state; the fleet learns of it
        # from the rolled_back event and may send a newer one.
        desired = self.state.desired()
        if desired is not None and desired.generation > self.state.applied_generation:
            self.state.mark_applied(desired.generation)
        self.retry_at = None
        log.warning("rolled back from %s to %s (slot %s)", _label(plan.from_ref),
                    _label(plan.to_ref), plan.slot)
        self._on_swap(loaded)
        self._report_rollback()
        return record

    def _rollback_record(self) -> RollbackRecord | None:
        raw = self.state.get(ROLLBACK_KEY)
        return RollbackRecord.from_json(raw) if raw else None

    def _set_rollback_record(self, record: RollbackRecord | None) -> None:
        if record is None and not self.state.get(ROLLBACK_KEY):
            return
        self.state.put(ROLLBACK_KEY, record.to_json() if record else "")

    def _report_rollback(self) -> None:
        record = self._rollback_record()
        if self._emit is None or record is None or record.reported:
            return
        self._emit("rolled_back", **record.event_detail())
        self._set_rollback_record(
            RollbackRecord(record.from_ref, record.to_ref, record.slot, reported=True)
        )
