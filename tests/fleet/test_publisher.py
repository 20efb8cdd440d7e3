"""Which connection desired states go out on (``fleet.publisher.publisher_for``).

No broker is contacted: the links are built, never started (the choice is the subject).
End to end, every fleet the e2e tests start publishes with an account of its own
(``tests/fixtures/processes.py``), on the production broker configuration.
"""

from __future__ import annotations

from agent.mqtt import BrokerAddress, MqttLink
from fleet.publisher import DesiredPublisher, SharedLinkPublisher, publisher_for

INGEST = MqttLink(BrokerAddress.parse("mqtt://127.0.0.1:1"), "edgefleet-fleet-w1",
                  on_message=lambda _m: None)


def test_an_account_of_its_own_is_used_with_its_user_name_as_client_id():
    publisher, said = publisher_for(
        BrokerAddress.parse("mqtt://edgefleet-fleet-w1:pw@broker:1883"),
        BrokerAddress.parse("mqtt://edgefleet-fleet-w1-publisher:pw2@broker:1883"),
        "w1", INGEST)
    assert isinstance(publisher, DesiredPublisher)
    assert publisher.link.client_id == "edgefleet-fleet-w1-publisher"
    assert "their own connection" in said


def test_a_broker_without_accounts_gets_a_publisher_named_after_the_worker():
    publisher, _ = publisher_for(BrokerAddress.parse("mqtt://127.0.0.1:1883"), None, "w1",
                                 INGEST)
    assert isinstance(publisher, DesiredPublisher)
    assert publisher.link.client_id == "edgefleet-fleet-w1-publisher"


def test_accounts_without_one_for_publishing_fall_back_to_the_ingest_link_and_say_how_to_fix():
    publisher, said = publisher_for(
        BrokerAddress.parse("mqtt://edgefleet-fleet-w1:pw@broker:1883"), None, "w1", INGEST)
    assert isinstance(publisher, SharedLinkPublisher) and publisher.link is INGEST
    assert "EDGEFLEET_PUBLISHER_BROKER_URL" in said and "add-account.sh" in said
