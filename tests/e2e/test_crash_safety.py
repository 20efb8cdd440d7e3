"""Power cuts during an install: the agent always comes back serving a verified model.

The agent process SIGKILLs itself at a named step of the install (``agent.faults``: the
one test hook in the product, an environment variable), exactly as a power cut stops it.
Then it is restarted without the hook. Real fleet, broker, HTTP, onnxruntime.
"""

from __future__ import annotations

import pytest

from agent.bundle import verify_slot
from agent.contract import to_data
from agent.faults import CRASH_POINTS
from agent.slots import Slots
from tests.fixtures.broker import FLEET_ACCOUNT
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until

V1 = {"name": "detector", "version": 1}
V2 = {"name": "detector", "version": 2}


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_agent_killed_during_an_install_comes_back_serving_a_verified_model(
    tmp_path, mosquitto, agents, make_bundle, crash_at
):
    fleet = start_fleet(
        tmp_path, mosquitto.url_for(FLEET_ACCOUNT), f"sqlite:///{tmp_path / 'fleet.db'}"
    )
    try:
        for version, seed in ((1, 0), (2, 1)):
            bundle = make_bundle(version=version, seed=seed)
            assert fleet.cli("bundle", "publish", str(bundle.path)).returncode == 0
        agents.enroll("dev", fleet.url)
        first = agents.start("dev", mosquitto)
        # The fleet deploys only to devices it has seen.
        wait_until(lambda: fleet.device("dev"), timeout=10, what="dev registered")
        assert fleet.cli("deploy", "detector", "--version", "1", "--device", "dev").returncode == 0
        wait_until(lambda: fleet.device("dev")["active_model"] == V1, timeout=20, what="v1")
        first.terminate()

        crashing = agents.start("dev", mosquitto, env={"EDGE_AGENT_CRASH_AT": crash_at})
        wait_until(lambda: fleet.device("dev")["online"], timeout=10, what="agent back")
        assert fleet.cli("deploy", "detector", "--version", "2", "--device", "dev").returncode == 0
        crashing.process.wait(20)
        assert crashing.process.returncode == -9, f"expected SIGKILL at {crash_at}"

        # On disk, right after the "power cut": current is a complete, verified install.
        slots = Slots(agents.state_dir("dev"))
        slots.recover()
        active = slots.active()
        assert active is not None and slots.is_complete(active)
        # Every crash point comes before the atomic rename, so the old model is current.
        assert to_data(verify_slot(slots.path(active)).ref) == V1

        log_start = len(crashing.log())
        restarted = agents.start("dev", mosquitto)
        wait_until(lambda: "serving detector v1 from slot" in restarted.log()[log_start:],
                   timeout=10, what="the restarted agent to serve v1 first")
        # ...and it finishes the interrupted update by itself.
        wait_until(lambda: fleet.device("dev")["active_model"] == V2, timeout=30, what="v2")
        assert "Traceback" not in restarted.log()[log_start:]
    finally:
        fleet.terminate()
