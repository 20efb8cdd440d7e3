"""``GET /api/v1/device-config``: what a device needs besides the root of trust to join.

``edge-agent enroll --fleet URL`` pins the fleet's TUF root and reads this, so the agent
learns the broker its fleet listens on instead of guessing ``127.0.0.1:1883`` (and joining
some other broker, where it would never appear). Open without a token, like ``/repo/``:
it holds only a host and a port, never credentials (devices get their own broker
accounts). It is not signed: a forged answer can only send a device to a broker where no
fleet signs its desired states, which it refuses, and where it is missing from the fleet,
which the agent warns about; the same as a network that drops its packets.

Which address: ``EDGEFLEET_DEVICE_BROKER_URL`` as given, when the fleet's public address
differs from what it binds (NAT, a proxy, another name). Otherwise the fleet's own broker
without its credentials; if that broker is on the loopback (the local broker), the host is
the one the device used to reach the API, so a device that reached ``http://fleet.lan:8000``
is told ``mqtt://fleet.lan:<port>``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from agent.mqtt import BrokerAddress

__all__ = ["DeviceBroker", "DeviceConfig", "router"]

router = APIRouter(tags=["devices"])


@dataclass(frozen=True)
class DeviceBroker:
    """The broker devices are told: ``fixed`` (configured) or following the request's host
    when ``address`` is on the loopback."""

    address: BrokerAddress
    fixed: bool = False

    @classmethod
    def from_urls(cls, fleet_broker: str, configured: str | None) -> DeviceBroker:
        """ValueError if ``configured`` is not an mqtt:// URL or carries credentials."""
        if configured:
            address = BrokerAddress.parse(configured)
            if address.username or address.password:
                raise ValueError(
                    "EDGEFLEET_DEVICE_BROKER_URL must not carry credentials: it is told to "
                    "every device; give only mqtt://HOST:PORT"
                )
            return cls(address, fixed=True)
        full = BrokerAddress.parse(fleet_broker)
        return cls(BrokerAddress(full.host, full.port, full.tls))

    def url_for(self, request_host: str | None) -> str:
        host = self.address.host
        if not self.fixed and request_host and _unusable_by_devices(host):
            host = request_host
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        return f"{'mqtts' if self.address.tls else 'mqtt'}://{host}:{self.address.port}"


def _unusable_by_devices(host: str) -> bool:
    """Loopback, or a wildcard bind address: not where another host can connect."""
    if host == "localhost" or host in ("0.0.0.0", "::", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DeviceConfig(BaseModel):
    broker: str | None = Field(
        description="mqtt://HOST:PORT (or mqtts://) devices connect to; no credentials. "
        "null when this fleet runs without a broker.",
        examples=["mqtt://fleet.lan:1883"],
    )


def get_device_broker(request: Request) -> DeviceBroker | None:
    return getattr(request.app.state, "device_broker", None)


DeviceBrokerDep = Annotated[DeviceBroker | None, Depends(get_device_broker)]


@router.get("/device-config", response_model=DeviceConfig)
def device_config(request: Request, broker: DeviceBrokerDep) -> DeviceConfig:
    """What `edge-agent enroll` stores besides the root of trust: the broker (open)."""
    if broker is None:
        return DeviceConfig(broker=None)
    return DeviceConfig(broker=broker.url_for(request.url.hostname))
