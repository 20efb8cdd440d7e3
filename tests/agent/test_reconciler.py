"""The reconciler: the one owner of the slots, fed commands from other threads.

Decisions are tested as the pure functions they are; the IO around them with real parts:
the fleet's signed repository served over real HTTP (a slow one where a test needs a
download to hang), python-tuf, onnxruntime health checks, the agent's SQLite state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from agent.contract import BundleRef, DesiredState, utcnow
from agent.errors import (
    CancelledError,
    DownloadError,
    HealthCheckError,
    RollbackRefusedError,
    TrustError,
)
from agent.installer import LoadedModel
from agent.reconciler import (
    Idle,
    Install,
    Outcome,
    Reconciler,
    RollbackRecord,
    RollbackTo,
    Settle,
    SlotFacts,
    after_install,
    next_step,
    plan_rollback,
    should_preempt,
)
from agent.state import AgentState
from agent.trust.download import DownloadLimits
from tests.fixtures.bundles import read_members, relist, write_members
from tests.fixtures.slow_http import SlowRepoServer, Stall
from tests.fixtures.trust import make_device_side
from tests.fixtures.waiting import wait_until

V1 = BundleRef(name="detector", version=1)
V2 = BundleRef(name="detector", version=2)
V3 = BundleRef(name="detector", version=3)


def _desired(generation: int, bundle: BundleRef | None) -> DesiredState:
    return DesiredState(device_id="dev", generation=generation, bundle=bundle,
                        issued_at=utcnow())


# ------------------------------------------------------------------ pure decisions


def test_next_step_follows_only_a_newer_generation():
    assert next_step(None, 0) == Idle()
    assert next_step(_desired(3, V1), 3) == Idle()
    assert next_step(_desired(4, None), 3) == Settle(4)
    assert next_step(_desired(4, V2), 3) == Install(4, V2)


def test_only_final_failures_are_applied_without_retry():
    assert after_install(None) is Outcome.APPLIED
    assert after_install(HealthCheckError("differs")) is Outcome.APPLIED
    assert after_install(DownloadError("too slow")) is Outcome.RETRY
    assert after_install(TrustError("expired")) is Outcome.RETRY
    assert after_install(CancelledError("superseded")) is Outcome.CANCELLED


def test_a_newer_desired_state_preempts_only_for_another_bundle():
    running = Install(5, V2)
    assert should_preempt(running, _desired(6, V3))
    assert should_preempt(running, _desired(6, None))
    assert not should_preempt(running, _desired(6, V2)), "same bundle: let it finish"
    assert not should_preempt(running, _desired(5, V3))


def test_rollback_plan_goes_to_the_other_slot_once():
    facts = SlotFacts(active="b", active_ref=V2, other="a", other_ref=V1)
    assert plan_rollback(facts, None) == RollbackTo("a", V2, V1)
    after = SlotFacts(active="a", active_ref=V1, other="b", other_ref=V2)
    with pytest.raises(RollbackRefusedError, match="already rolled back from detector v2 to "
                                                   "detector v1"):
        plan_rollback(after, RollbackRecord(V2, V1, "a"))
    # After the fleet installed v3 over v2 (which clears the record), back to v1... er, v2.
    later = SlotFacts(active="b", active_ref=V3, other="a", other_ref=V1)
    assert plan_rollback(later, RollbackRecord(V2, V1, "a")) == RollbackTo("a", V3, V1)


@pytest.mark.parametrize(
    ("facts", "match"),
    [
        (SlotFacts(active=None, active_ref=None, other="a", other_ref=None), "no model"),
        (SlotFacts(active="a", active_ref=V1, other="b", other_ref=None), "no previous model"),
    ],
    ids=["nothing_active", "nothing_to_go_back_to"],
)
def test_rollback_with_nothing_to_go_back_to_is_refused(facts, match):
    with pytest.raises(RollbackRefusedError, match=match):
        plan_rollback(facts, None)


# --------------------------------------------------------------- the IO around them


@dataclass
class Device:
    """An enrolled device's reconciler, running on its own thread as in the daemon."""

    reconciler: Reconciler
    state: AgentState
    events: list[tuple[str, dict]]
    installer: object
    serving: list[LoadedModel] = field(default_factory=list)

    def want(self, generation: int, bundle: BundleRef | None) -> None:
        """What the daemon's intake does with a verified desired state."""
        desired = _desired(generation, bundle)
        assert self.state.accept_desired(desired)
        self.reconciler.desired_changed(desired)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def current(self) -> LoadedModel | None:
        return self.serving[-1] if self.serving else None


@pytest.fixture
def slow_repo(repo_server) -> Iterator[SlowRepoServer]:
    server = SlowRepoServer(repo_server.repository.data_dir / "repo").start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def _device(tmp_path, url: str, **limits) -> Iterator[Device]:
    side = make_device_side(tmp_path / "dev", url,
                            limits=DownloadLimits(**limits) if limits else None)
    state = AgentState(side.state_dir)
    device: Device

    def swap(model: LoadedModel) -> None:
        device.serving.append(model)

    reconciler = Reconciler(
        state, side.installer, emit=lambda name, **d: side.events.append((name, d)),
        current=lambda: device.current(), on_swap=swap, retry_initial_s=0.2, retry_max_s=1,
    )
    device = Device(reconciler, state, side.events, side.installer)
    reconciler.start()
    try:
        yield device
    finally:
        reconciler.stop()
        for model in device.serving:
            model.engine.close()
        state.close()


def test_a_newer_desired_state_preempts_a_stuck_download(
    repo_server, slow_repo, make_bundle, tmp_path
):
    """v1's download hangs (limits that would wait ten minutes); generation 2 names v2:
    the v1 download is cancelled at once and v2 is installed."""
    repo_server.publish(make_bundle(version=1, seed=0))
    repo_server.publish(make_bundle(version=2, seed=1))
    slow_repo.modes["detector-1.bundle"] = Stall(after=1000)
    with _device(tmp_path, slow_repo.url, deadline_s=600, floor_bps=0) as device:
        device.want(1, V1)
        wait_until(lambda: slow_repo.target_requests("detector-1.bundle"), timeout=20,
                   what="the v1 download to start")

        device.want(2, V2)

        wait_until(lambda: "healthy" in device.names(), timeout=30, what="v2 healthy")
        assert device.names() == [
            "downloading", "cancelled", "downloading", "verified", "installed", "healthy"
        ], device.events
        assert device.events[1][1] == {"bundle": {"name": "detector", "version": 1},
                                       "reason": "superseded by generation 2"}
        assert device.current().manifest.ref == V2
        assert device.installer.slots.active() == device.current().slot
        wait_until(lambda: device.state.applied_generation == 2, timeout=5, what="applied")
        assert not list((device.state.path.parent / "downloads").glob("*.part")), \
            "the superseded partial download is removed"


def test_a_bundle_with_corrupt_samples_fails_once_and_is_not_retried(
    repo_server, make_bundle, tmp_path
):
    members = read_members(make_bundle(version=1).path)
    index = next(i for i, (info, _) in enumerate(members) if info.name == "samples.npz")
    members[index] = (members[index][0], members[index][1][:100])
    repo_server.publish_raw(write_members(tmp_path / "bad.bundle", relist(members)),
                            "detector-1.bundle")
    with _device(tmp_path, repo_server.url) as device:
        device.want(1, V1)

        wait_until(lambda: device.state.applied_generation == 1, timeout=30,
                   what="generation 1 settled")
        assert [(n, d["reason"]) for n, d in device.events if n == "failed"] == [
            ("failed", "health_check_failed")
        ]
        assert device.reconciler.retry_at is None, "a final failure is not retried"
        assert device.names() == ["downloading", "verified", "installed", "failed"]
        assert device.current() is None


def test_a_failure_that_may_pass_is_retried_with_backoff(repo_server, make_bundle, tmp_path):
    """An unknown target (published later) is not final: retried until it installs."""
    with _device(tmp_path, repo_server.url) as device:
        device.want(1, V1)
        wait_until(lambda: device.reconciler.retry_at is not None, timeout=20,
                   what="a retry scheduled")
        assert device.events[-1][1]["reason"] == "unknown_target"

        repo_server.publish(make_bundle(version=1))

        wait_until(lambda: "healthy" in device.names(), timeout=30, what="v1 installed on retry")
        assert device.state.applied_generation == 1


def test_disk_checks_from_another_thread_never_break_an_install(
    repo_server, make_bundle, tmp_path
):
    """The old shape: the main loop's check recovered slots while the worker switched them.
    Now every check is a command on the reconciler's thread: hammering it while v1 -> v2
    -> v1 -> v2 installs fails nothing and loads each model once."""
    repo_server.publish(make_bundle(version=1, seed=0))
    repo_server.publish(make_bundle(version=2, seed=1))
    with _device(tmp_path, repo_server.url) as device:
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                device.reconciler.follow_disk()

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for generation, ref in enumerate((V1, V2, V1, V2), start=1):
                device.want(generation, ref)
                wait_until(lambda g=generation: device.state.applied_generation == g,
                           timeout=30, what=f"generation {generation}")
        finally:
            stop.set()
            thread.join()
        assert device.names().count("failed") == 0, device.events
        assert [m.manifest.ref for m in device.serving] == [V1, V2, V1, V2]


def test_a_rollback_cancels_an_install_in_progress_and_is_reported(
    repo_server, slow_repo, make_bundle, tmp_path
):
    repo_server.publish(make_bundle(version=1, seed=0))
    repo_server.publish(make_bundle(version=2, seed=1))
    repo_server.publish(make_bundle(version=3, seed=2))
    slow_repo.modes["detector-3.bundle"] = Stall(after=1000)
    with _device(tmp_path, slow_repo.url, deadline_s=600, floor_bps=0) as device:
        for generation, ref in ((1, V1), (2, V2)):
            device.want(generation, ref)
            wait_until(lambda g=generation: device.state.applied_generation == g, timeout=30,
                       what=f"generation {generation}")
        device.want(3, V3)
        wait_until(lambda: slow_repo.target_requests("detector-3.bundle"), timeout=20,
                   what="the v3 download to start")

        record = device.reconciler.request_rollback().result(timeout=30)

        assert (record.from_ref, record.to_ref) == (V2, V1)
        assert device.current().manifest.ref == V1
        rolled = [d for n, d in device.events if n == "rolled_back"]
        assert rolled == [{"from": {"name": "detector", "version": 2},
                           "to": {"name": "detector", "version": 1},
                           "slot": record.slot, "by": "edge-agent rollback"}]
        assert ("cancelled", {"bundle": {"name": "detector", "version": 3},
                              "reason": "rollback requested on the device"}) in device.events
        assert device.state.applied_generation == 3, "the device's operator overrode it"
        with pytest.raises(RollbackRefusedError, match="would go forward"):
            device.reconciler.request_rollback().result(timeout=30)
        assert device.current().manifest.ref == V1


def test_a_new_generation_naming_the_active_bundle_is_confirmed_healthy_once(
    repo_server, make_bundle, tmp_path
):
    """Nothing to install, but the fleet must hear that the generation is served (a rollout
    waits for it): also what a device says after a crash cut an install off after the
    switch and its restart loaded the new model."""
    repo_server.publish(make_bundle(version=1))
    with _device(tmp_path, repo_server.url) as device:
        device.want(1, V1)
        wait_until(lambda: device.state.applied_generation == 1, timeout=30, what="v1")
        device.want(2, V1)
        wait_until(lambda: device.state.applied_generation == 2, timeout=30, what="gen 2")
        assert device.names() == ["downloading", "verified", "installed", "healthy", "healthy"]
        assert device.events[-1][1] == {"bundle": {"name": "detector", "version": 1},
                                        "slot": device.current().slot, "already_active": True}
        assert len(device.serving) == 1, "the serving model is not reloaded"
