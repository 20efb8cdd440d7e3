"""An agent records the desired state addressed to it and refuses an older generation.

Real broker, real agent and fleet processes. (Signing of desired states and installing the
named bundle build on this path; here the agent only records and reports.)
"""

from __future__ import annotations

from agent.contract import BundleRef, DesiredState, encode, topic, utcnow
from tests.fixtures.waiting import wait_until


def _desired(device_id: str, generation: int) -> bytes:
    return encode(
        DesiredState(
            device_id=device_id,
            generation=generation,
            bundle=BundleRef(name="detector", version=generation),
            issued_at=utcnow(),
        )
    )


def test_desired_state_is_recorded_reported_and_older_generations_refused(
    fleet_server, mosquitto, agents, raw_mqtt
):
    agent = agents.start("edge-7", mosquitto.url)
    wait_until(lambda: fleet_server.device("edge-7"), timeout=10, what="edge-7 registered")

    raw_mqtt.publish(topic("edge-7", "desired"), _desired("edge-7", 5), retain=True)
    wait_until(
        lambda: fleet_server.device("edge-7")["desired_generation"] == 5,
        timeout=10,
        what="generation 5 reported back",
    )

    raw_mqtt.publish(topic("edge-7", "desired"), _desired("edge-7", 3), retain=True)
    wait_until(
        lambda: "refused desired generation 3" in agent.log(), timeout=10, what="refusal logged"
    )
    # a desired state addressed to another device is refused too
    raw_mqtt.publish(topic("edge-7", "desired"), _desired("edge-8", 9))
    wait_until(lambda: "wrong_device" in agent.log(), timeout=10, what="wrong device refused")
    assert fleet_server.device("edge-7")["desired_generation"] == 5

    # After a restart the agent still holds generation 5 and refuses the retained older one.
    agent.terminate()
    agents.start("edge-7", mosquitto.url)
    wait_until(
        lambda: (d := fleet_server.device("edge-7"))["online"] and d["desired_generation"] == 5,
        timeout=10,
        what="edge-7 back online with generation 5",
    )
