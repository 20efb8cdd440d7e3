"""The rollout's pure parts: wave membership, gates, device transitions and decisions.

No IO here by design (``fleet.rollouts.machine``): every case is a stored state and a
clock, and the answer is what the controller must do.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.rollouts.gates import DeviceFigures, GatePolicy, Verdict, evaluate
from fleet.rollouts.machine import (
    SETTLED,
    TRANSITIONS,
    Advance,
    Complete,
    DeviceState,
    DeviceView,
    Halt,
    MarkStuck,
    Notify,
    Policy,
    Redrive,
    RollBack,
    RolloutStatus,
    RolloutView,
    TransitionError,
    decide,
    state_for_event,
    transition,
)
from fleet.rollouts.waves import DEFAULT_WAVES, WaveSpec, assign_waves, parse_waves

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IDS = [f"cam-{i:03d}" for i in range(200)]


# --- waves ------------------------------------------------------------------------------

def test_default_waves_are_one_canary_then_10_50_100_percent():
    waves = assign_waves("r1", IDS, DEFAULT_WAVES)
    assert [len(w) for w in waves] == [1, 19, 80, 100]
    assert sorted(d for w in waves for d in w) == sorted(IDS), "each device in one wave"


def test_wave_membership_survives_a_restart_and_differs_between_rollouts():
    assert assign_waves("r1", IDS, DEFAULT_WAVES) == assign_waves(
        "r1", list(reversed(IDS)), DEFAULT_WAVES)
    assert assign_waves("r1", IDS, DEFAULT_WAVES)[0] != assign_waves("r2", IDS,
                                                                      DEFAULT_WAVES)[0]


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 300), specs=st.lists(
    st.one_of(st.builds(WaveSpec, count=st.integers(1, 400)),
              st.builds(WaveSpec, percent=st.floats(0.01, 100))), min_size=1, max_size=6))
def test_every_device_lands_in_exactly_one_wave(total, specs):
    ids = [f"d{i}" for i in range(total)]
    waves = assign_waves("r", ids, specs)
    assert len(waves) == len(specs)
    assert sorted(d for w in waves for d in w) == sorted(ids)


@pytest.mark.parametrize("text", ["", "0", "10%%", "150%", "a", "1,,2", "0%", ",".join("1" * 21)])
def test_a_malformed_wave_list_is_refused(text):
    with pytest.raises(ValueError):
        parse_waves(text)


def test_waves_parse_counts_and_shares():
    assert [str(w) for w in parse_waves("1, 5, 25%,100%")] == ["1", "5", "25%", "100%"]


# --- gates ------------------------------------------------------------------------------

def _healthy(device_id: str, *, inferences=100, model_errors=0, client_errors=0,
             before=1.0, after=1.0, offline=False) -> DeviceFigures:
    return DeviceFigures(device_id, installed=True, failed=False, inferences=inferences,
                         model_errors=model_errors, client_errors=client_errors,
                         latency_p95_before=before, latency_p95_after=after,
                         went_offline=offline)


def _failed(device_id: str) -> DeviceFigures:
    return DeviceFigures(device_id, installed=False, failed=True)


POLICY = GatePolicy()


def _verdicts(wave) -> dict[str, Verdict]:
    _, results = evaluate(wave, POLICY)
    return {r.gate: r.verdict for r in results}


def test_a_good_wave_passes_every_gate():
    verdict, results = evaluate([_healthy(f"d{i}") for i in range(10)], POLICY)
    assert verdict is Verdict.PASS
    assert {r.gate for r in results} == {"install_failure_rate", "model_error_rate",
                                         "latency_p95_ratio", "offline_rate"}


def test_health_check_failures_halt():
    wave = [_failed(f"d{i}") for i in range(3)] + [_healthy(f"h{i}") for i in range(7)]
    assert _verdicts(wave)["install_failure_rate"] is Verdict.FAIL


def test_doubled_latency_halts_but_one_slow_device_does_not():
    assert _verdicts([_healthy(f"d{i}", after=2.0) for i in range(5)])[
        "latency_p95_ratio"] is Verdict.FAIL
    one_slow = [_healthy("slow", after=5.0)] + [_healthy(f"d{i}") for i in range(4)]
    assert _verdicts(one_slow)["latency_p95_ratio"] is Verdict.PASS


def test_model_errors_halt_and_client_errors_never_do():
    assert _verdicts([_healthy(f"d{i}", model_errors=5) for i in range(5)])[
        "model_error_rate"] is Verdict.FAIL
    verdict, _ = evaluate([_healthy(f"d{i}", client_errors=90) for i in range(5)], POLICY)
    assert verdict is Verdict.PASS


def test_devices_gone_offline_since_the_install_halt():
    wave = [_healthy(f"d{i}", offline=i < 3) for i in range(10)]
    assert _verdicts(wave)["offline_rate"] is Verdict.FAIL


def test_too_little_traffic_waits_then_passes_after_the_bake_time_saying_so():
    idle = [_healthy(f"d{i}", inferences=3) for i in range(5)]
    assert evaluate(idle, POLICY)[0] is Verdict.WAIT
    verdict, results = evaluate(idle, POLICY, bake_over=True)
    assert verdict is Verdict.PASS
    assert any(r.detail.startswith("not judged") for r in results)
    strict = GatePolicy(pass_unjudged_after_bake=False)
    assert evaluate(idle, strict, bake_over=True)[0] is Verdict.WAIT


def test_first_installs_have_no_latency_to_compare_and_pass_that_gate():
    wave = [_healthy(f"d{i}", before=None) for i in range(3)]
    assert _verdicts(wave)["latency_p95_ratio"] is Verdict.PASS


def test_a_gate_waits_for_its_minimum_of_devices():
    policy = GatePolicy(min_devices=5)
    verdict, results = evaluate([_failed("d0")], policy)
    assert verdict is Verdict.WAIT
    assert results[0].as_record()["devices"] == 1


# --- transitions ------------------------------------------------------------------------

def test_devices_only_move_forward():
    assert transition(DeviceState.PENDING, DeviceState.NOTIFIED) is DeviceState.NOTIFIED
    with pytest.raises(TransitionError, match="healthy to downloading"):
        transition(DeviceState.HEALTHY, DeviceState.DOWNLOADING)
    with pytest.raises(TransitionError):
        transition(DeviceState.ROLLED_BACK, DeviceState.NOTIFIED)
    assert state_for_event("healthy") is DeviceState.HEALTHY
    assert state_for_event("started") is None
    # A failure the agent retries is not a failed install; a final one is.
    assert state_for_event("failed", {"reason": "download_failed", "final": False}) is (
        DeviceState.DOWNLOADING)
    assert state_for_event("failed", {"reason": "health_check_failed", "final": True}) is (
        DeviceState.FAILED)
    assert state_for_event("failed", {"reason": "hash_mismatch"}) is DeviceState.FAILED


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.sampled_from(list(DeviceState)), max_size=12))
def test_any_event_sequence_either_follows_the_transitions_or_is_refused(steps):
    state = DeviceState.PENDING
    for step in steps:
        try:
            state = transition(state, step)
        except TransitionError:
            assert step not in TRANSITIONS[state]
    assert state in TRANSITIONS


# --- decisions ----------------------------------------------------------------------------

def _view(devices, *, wave=0, started=T0, status=RolloutStatus.RUNNING, **policy) -> RolloutView:
    return RolloutView("r1", status, Policy(bake_s=60, stuck_timeout_s=120, **policy), wave,
                       started, devices)


def _device(device_id, wave, state, figures=None, notified_at=T0, redrives=0):
    return DeviceView(device_id, wave, state, notified_at, redrives, figures)


def test_the_wave_in_progress_is_notified_and_no_other():
    devices = [_device("a", 0, DeviceState.PENDING, notified_at=None),
               _device("b", 1, DeviceState.PENDING, notified_at=None)]
    assert decide(_view(devices), T0) == [Notify(("a",))]


def test_a_settled_passing_wave_advances_only_after_its_bake_time():
    devices = [_device("a", 0, DeviceState.HEALTHY, _healthy("a")),
               _device("b", 1, DeviceState.PENDING, notified_at=None)]
    assert decide(_view(devices), T0 + timedelta(seconds=30)) == []
    actions = decide(_view(devices), T0 + timedelta(seconds=61))
    assert len(actions) == 1 and isinstance(actions[0], Advance) and actions[0].to_wave == 1


def test_the_last_wave_completes():
    devices = [_device("a", 3, DeviceState.HEALTHY, _healthy("a"))]
    actions = decide(_view(devices, wave=3), T0 + timedelta(seconds=61))
    assert len(actions) == 1 and isinstance(actions[0], Complete)


def test_a_failing_gate_halts_at_once_and_rolls_the_wave_back():
    devices = [_device("a", 1, DeviceState.FAILED, _failed("a")),
               _device("b", 1, DeviceState.HEALTHY, _healthy("b")),
               _device("c", 1, DeviceState.DOWNLOADING),
               _device("old", 0, DeviceState.HEALTHY, _healthy("old")),
               _device("later", 2, DeviceState.PENDING, notified_at=None)]
    actions = decide(_view(devices, wave=1), T0 + timedelta(seconds=5))
    halt, rollback = actions
    assert isinstance(halt, Halt) and "install_failure_rate" in halt.reason
    assert any(g.gate == "install_failure_rate" and g.value == 0.5 for g in halt.gates)
    assert rollback == RollBack(("b", "c")), "the wave's updated devices, nobody else"
    everyone = decide(_view(devices, wave=1, roll_back_scope="all"), T0)
    assert everyone[1] == RollBack(("b", "c", "old")), "every updated device, no later wave"
    no_rollback = decide(_view(devices, wave=1, roll_back_on_failure=False), T0)
    assert [type(a) for a in no_rollback] == [Halt]


def test_silent_devices_are_redriven_then_marked_stuck_and_do_not_block():
    devices = [_device("quiet", 0, DeviceState.NOTIFIED, redrives=0),
               _device("gone", 0, DeviceState.DOWNLOADING, redrives=2),
               _device("fine", 0, DeviceState.HEALTHY, _healthy("fine"))]
    assert decide(_view(devices), T0 + timedelta(seconds=60)) == []
    actions = decide(_view(devices), T0 + timedelta(seconds=121))
    assert Redrive(("quiet",)) in actions and MarkStuck(("gone",)) in actions
    stuck_now = [_device("quiet", 0, DeviceState.STUCK), devices[1], devices[2]]
    stuck_now[1] = _device("gone", 0, DeviceState.STUCK)
    actions = decide(_view(stuck_now), T0 + timedelta(seconds=121))
    assert isinstance(actions[-1], Advance)
    assert DeviceState.STUCK in SETTLED


def test_the_rate_limit_caps_notifications():
    devices = [_device(f"d{i}", 0, DeviceState.PENDING, notified_at=None) for i in range(10)]
    view = _view(devices, notify_per_minute=4)
    assert decide(view, T0) == [Notify(("d0", "d1", "d2", "d3"))]


def test_nothing_happens_unless_running():
    devices = [_device("a", 0, DeviceState.PENDING, notified_at=None)]
    for status in (RolloutStatus.PAUSED, RolloutStatus.AWAITING_APPROVAL,
                   RolloutStatus.HALTED, RolloutStatus.COMPLETED):
        assert decide(_view(devices, status=status), T0) == []


def test_an_empty_wave_moves_on():
    assert decide(_view([], wave=1), T0) == [Advance(2, ())]
    assert decide(_view([], wave=3), T0) == [Complete(())]


def test_the_rate_limit_counts_what_the_last_minute_already_notified():
    devices = [_device(f"d{i}", 0, DeviceState.PENDING, notified_at=None) for i in range(10)]
    view = RolloutView("r1", RolloutStatus.RUNNING,
                       Policy(bake_s=60, stuck_timeout_s=120, notify_per_minute=4), 0, T0,
                       devices, notified_last_minute=3)
    assert decide(view, T0) == [Notify(("d0",))]
