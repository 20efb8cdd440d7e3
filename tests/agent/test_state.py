"""The agent's durable state: seq never repeats across restarts, desired state only moves on."""

from __future__ import annotations

from agent.contract import BundleRef, DesiredState, utcnow
from agent.state import AgentState


def _desired(generation: int) -> DesiredState:
    return DesiredState(
        device_id="d", generation=generation, bundle=BundleRef(name="m", version=generation),
        issued_at=utcnow(),
    )


def test_seq_keeps_growing_across_reopen(tmp_path):
    state = AgentState(tmp_path)
    first = [state.next_seq() for _ in range(5)]
    state.close()
    reopened = AgentState(tmp_path)
    assert first == list(range(first[0], first[0] + 5))
    assert reopened.next_seq() > first[-1]  # the rest of the reserved block is skipped
    reopened.close()


def test_a_wiped_state_still_counts_above_the_old_one(tmp_path):
    old = AgentState(tmp_path / "old")
    last = max(old.next_seq() for _ in range(3))
    old.close()
    fresh = AgentState(tmp_path / "new")  # the same device after its state was lost
    assert fresh.next_seq() > last
    fresh.close()


def test_only_a_newer_desired_generation_is_accepted(tmp_path):
    state = AgentState(tmp_path)
    assert state.desired() is None
    assert state.accept_desired(_desired(2))
    assert not state.accept_desired(_desired(2))
    assert not state.accept_desired(_desired(1))
    assert state.desired().generation == 2
    assert state.accept_desired(_desired(3))
    state.close()
    assert AgentState(tmp_path).desired().generation == 3
