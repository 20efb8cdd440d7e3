"""The agent daemon: keep a presence on the broker, report state, follow the desired state.

What the fleet can rely on while this runs:

* ``status`` (retained) says online after each (re)connection and offline on a clean stop;
  an unclean end (crash, power cut, network loss) publishes the Last Will armed for that
  very connection, so the fleet always learns of it within the broker's keepalive window.
* ``reported`` (retained) is republished on every connection and whenever it changes.
* a heartbeat goes to ``telemetry`` every ``interval`` seconds while connected.
* a ``desired`` state is recorded only if it is addressed to this device and its generation
  is newer than the one accepted before; an equal generation is the retained copy coming
  back after a reconnect and is ignored; an older one is refused and reported as an event.
  (Fetching and installing the named bundle is built on top of this.)
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from agent import __version__
from agent.contract import (
    Channel,
    DesiredState,
    EventMessage,
    HeartbeatTelemetry,
    MessageRejected,
    PlatformInfo,
    ReportedState,
    StatusMessage,
    decode_desired,
    encode,
    topic,
    utcnow,
)
from agent.mqtt import BrokerAddress, Inbound, MqttLink, Will
from agent.process_stats import ProcessSampler
from agent.state import AgentState
from agent.stats import InferenceStats

__all__ = ["AgentConfig", "AgentDaemon", "platform_info"]

log = logging.getLogger(__name__)

_RUNTIME_DISTRIBUTIONS = ("onnxruntime", "ai-edge-litert", "tflite-runtime")


def platform_info() -> PlatformInfo:
    runtimes = {}
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            runtimes[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return PlatformInfo(
        system=platform.system(),
        release=platform.release(),
        machine=platform.machine(),
        python=platform.python_version(),
        runtimes=runtimes,
    )


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerAddress
    device_id: str
    state_dir: Path
    interval_s: float = 10.0
    keepalive_s: int = 15


class AgentDaemon:
    def __init__(self, config: AgentConfig, stats: InferenceStats | None = None) -> None:
        self.config = config
        self.stats = stats or InferenceStats()
        self.state = AgentState(config.state_dir)
        self._sampler = ProcessSampler()
        self._platform = platform_info()
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()
        # The connection id is the seq reserved for that connection's Last Will.
        self._armed_connection = 0
        self._connection = 0
        self.link = MqttLink(
            config.broker,
            client_id=f"edgefleet-agent-{config.device_id}",
            on_message=self._on_message,
            on_connect=self._on_connect,
            will_factory=self._next_will,
            keepalive=config.keepalive_s,
        )

    def _topic(self, channel: Channel) -> str:
        return topic(self.config.device_id, channel)

    def _envelope(self) -> dict:
        return {
            "device_id": self.config.device_id,
            "seq": self.state.next_seq(),
            "sent_at": utcnow(),
        }

    def _next_will(self) -> Will:
        seq = self.state.next_seq()
        self._armed_connection = seq
        offline = StatusMessage(
            device_id=self.config.device_id,
            seq=seq,
            sent_at=utcnow(),
            state="offline",
            connection=seq,
        )
        return Will(self._topic(Channel.STATUS), encode(offline))

    def _status(self, state: str) -> StatusMessage:
        return StatusMessage(**self._envelope(), state=state, connection=self._connection)

    def _reported(self) -> ReportedState:
        desired = self.state.desired()
        return ReportedState(
            **self._envelope(),
            agent_version=__version__,
            active_model=None,
            platform=self._platform,
            desired_generation=desired.generation if desired else None,
            desired_bundle=desired.bundle if desired else None,
        )

    def _publish(self, channel: Channel, message, *, retain: bool = False) -> None:
        with self._publish_lock:
            self.link.publish(self._topic(channel), encode(message), qos=1, retain=retain)

    def _event(self, event: str, **detail) -> None:
        self._publish(Channel.EVENTS, EventMessage(**self._envelope(), event=event, detail=detail))

    def _on_connect(self) -> None:
        self._connection = self._armed_connection
        self.link.subscribe(self._topic(Channel.DESIRED), qos=1)
        self._publish(Channel.STATUS, self._status("online"), retain=True)
        self._publish(Channel.REPORTED, self._reported(), retain=True)

    def _on_message(self, message: Inbound) -> None:
        if message.topic != self._topic(Channel.DESIRED):
            log.warning("ignoring a message on unexpected topic %s", message.topic)
            return
        if not message.payload:  # a cleared retained desired state
            return
        try:
            desired = decode_desired(self.config.device_id, message.payload)
        except MessageRejected as exc:
            log.warning("refused desired state: %s", exc)
            self._event("desired_rejected", reason=exc.reason, detail=exc.detail)
            return
        self._apply_desired(desired)

    def _apply_desired(self, desired: DesiredState) -> None:
        current = self.state.desired()
        if current is not None and desired.generation == current.generation:
            return  # the retained copy, seen again after a reconnect
        if not self.state.accept_desired(desired):
            log.warning(
                "refused desired generation %d: generation %d was already accepted",
                desired.generation,
                current.generation if current else 0,
            )
            self._event(
                "desired_rejected",
                reason="stale_generation",
                detail=f"generation {desired.generation} is not newer than "
                f"{current.generation if current else 0}",
            )
            return
        bundle = desired.bundle.model_dump() if desired.bundle else None
        log.info("accepted desired generation %d: bundle %s", desired.generation, bundle)
        self._event("desired_received", generation=desired.generation, bundle=bundle)
        self._publish(Channel.REPORTED, self._reported(), retain=True)

    def heartbeat(self) -> HeartbeatTelemetry:
        sample = self._sampler.sample()
        return HeartbeatTelemetry(
            **self._envelope(),
            uptime_s=sample.uptime_s,
            cpu_percent=sample.cpu_percent,
            rss_mb=sample.rss_mb,
            **self.stats.snapshot(),
        )

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Block until :meth:`stop`; survives any number of broker outages."""
        log.info(
            "agent %s starting: device %s, broker %s, state %s",
            __version__,
            self.config.device_id,
            self.config.broker,
            self.config.state_dir,
        )
        self.link.start()
        try:
            while not self._stop.wait(self.config.interval_s):
                if self.link.connected:
                    self._publish(Channel.TELEMETRY, self.heartbeat())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.link.connected:
            info = self.link.publish(
                self._topic(Channel.STATUS), encode(self._status("offline")), qos=1, retain=True
            )
            # If the broker went away meanwhile, the Last Will says offline instead.
            with contextlib.suppress(RuntimeError):
                info.wait_for_publish(timeout=3)
        self.link.close()
        self.state.close()
        log.info("agent stopped")
