"""Desired states go out on an MQTT connection of their own.

The ingest worker's connection carries every device's telemetry in: under a storm of it
(a reconnect wave, a backlog drained after an outage) paho's one network thread is busy
reading, and a desired state queued behind would wait. So the fleet publishes desired
states (operator deployments, the rollout controller, re-sends) through a
:class:`DesiredPublisher` with its own client id, and everything that publishes asks it
whether the broker is there (an API that cannot publish says so instead of answering as
if it had).

A production broker binds each account to one client id (``deploy/mosquitto``), so the
publisher needs an account of its own: ``EDGEFLEET_PUBLISHER_BROKER_URL``
(``add-account.sh edgefleet-fleet-WORKER-publisher``). A broker without accounts (the
local one ``edge-fleet serve`` starts) needs nothing: the publisher connects with the
worker's id and ``-publisher``. With accounts and no publisher account configured, the
fleet falls back to the ingest connection and says so at start-up.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

from agent.mqtt import BrokerAddress, MqttLink
from fleet.ingest import FLEET_ACCOUNT_PREFIX

__all__ = ["DesiredPublisher", "Publisher", "SharedLinkPublisher", "publisher_for"]

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What publishes desired states: retained, QoS 1, to one device's topic."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic_name: str, payload: bytes) -> None: ...


class DesiredPublisher:
    """A connection that only publishes. A publish made while the broker is away is held
    by paho and sent on reconnect (QoS 1); callers learn from :attr:`connected` that it
    has not gone out yet."""

    def __init__(self, broker: BrokerAddress, client_id: str) -> None:
        self.link = MqttLink(broker, client_id=client_id, on_message=lambda _m: None,
                             max_backoff=5)

    @property
    def connected(self) -> bool:
        return self.link.connected

    def publish(self, topic_name: str, payload: bytes) -> None:
        self.link.publish(topic_name, payload, qos=1, retain=True)

    def start(self) -> DesiredPublisher:
        self.link.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.link.wait_connected(timeout)

    def stop(self) -> None:
        self.link.close()


class SharedLinkPublisher:
    """Publishing over another connection (the ingest worker's): the fallback when no
    account of its own is configured, and for tools that have only one link."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link

    @property
    def connected(self) -> bool:
        return self.link.connected

    def publish(self, topic_name: str, payload: bytes) -> None:
        self.link.publish(topic_name, payload, qos=1, retain=True)

    def start(self) -> SharedLinkPublisher:
        return self

    def stop(self) -> None:
        """The link is its owner's to close."""


def publisher_for(
    broker: BrokerAddress,
    publisher_broker: BrokerAddress | None,
    worker_id: str | None,
    ingest_link: MqttLink,
) -> tuple[DesiredPublisher | SharedLinkPublisher, str]:
    """The publisher this worker should use, and a line saying which for the start-up log."""
    if publisher_broker is not None:
        client_id = (publisher_broker.username if publisher_broker.username
                     and publisher_broker.username.startswith(FLEET_ACCOUNT_PREFIX)
                     else f"{FLEET_ACCOUNT_PREFIX}{worker_id or uuid.uuid4().hex[:12]}"
                     "-publisher")
        return (DesiredPublisher(publisher_broker, client_id),
                f"desired states: their own connection to {publisher_broker} ({client_id})")
    if broker.username is None:
        client_id = f"{FLEET_ACCOUNT_PREFIX}{worker_id or uuid.uuid4().hex[:12]}-publisher"
        return (DesiredPublisher(broker, client_id),
                f"desired states: their own connection ({client_id})")
    return (SharedLinkPublisher(ingest_link),
            "desired states: over the ingest connection (the broker has accounts and "
            "EDGEFLEET_PUBLISHER_BROKER_URL names none for publishing; add one with "
            "deploy/mosquitto/add-account.sh edgefleet-fleet-WORKER-publisher)")
