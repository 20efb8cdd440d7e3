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
* an accepted desired state goes to the reconciler (:mod:`agent.reconciler`), the one
  owner of the model slots, which installs it, cancelling an install it supersedes.
* ``edge-agent rollback`` reaches the running daemon over its control socket
  (:mod:`agent.control`); the rollback runs on the reconciler's thread and is reported to
  the fleet as ``rolled_back``. The daemon holds the slots' lock file for its whole life:
  no other process changes the slots while it runs.

* the serving bundle's inputs and outputs are counted on its baseline's bins
  (:mod:`agent.drift`); each closed window (``drift_window_s``, 5 minutes by default) goes
  to ``drift`` through the outbox, as counts only: no input ever leaves the device.

* the daemon says when it cannot work as a device of a fleet: at start-up when it is not
  enrolled (every desired state would be refused) or runs on the default broker for want
  of another, and once connected, if nothing comes from a fleet for ``fleet_silence_s``
  (:func:`fleet_silence`): a device on the wrong broker never appears in its fleet.

Threads: paho's network thread only queues desired-state payloads; the intake thread
verifies and accepts them (it may refresh TUF metadata); the reconciler thread installs,
rolls back and switches; the main thread queues heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from agent import __version__
from agent.contract import (
    ActiveModel,
    Channel,
    EventMessage,
    HeartbeatTelemetry,
    MessageRejected,
    PlatformInfo,
    ReportedState,
    StatusMessage,
    decode_desired,
    encode,
    fit_detail,
    to_data,
    topic,
    utcnow,
)
from agent.control import ControlServer, socket_path
from agent.drift.plan import BaselineError, DriftPlan, load_drift_plan
from agent.drift.window import DEFAULT_SAMPLE_RATE, DEFAULT_WINDOW_S, DriftWindow, WindowReport
from agent.endpoint import DEFAULT_MAX_REQUEST_BYTES, InferenceEndpoint
from agent.errors import (
    StaleDesiredStateError,
    TrustError,
    UnsignedDesiredStateError,
    UpdateError,
)
from agent.installer import Installer, LoadedModel
from agent.mqtt import Backoff, BrokerAddress, Inbound, MqttLink, Will
from agent.outbox import Outbox, OutboxDrainer, Pending
from agent.process_stats import ProcessSampler, release_free_memory
from agent.reconciler import Reconciler
from agent.runtime import EngineOptions
from agent.sd_notify import Notifier
from agent.serving import ModelHost
from agent.slots import SlotsBusyError
from agent.state import AgentState, is_enrolled
from agent.stats import InferenceStats
from agent.trust.download import DownloadLimits

if TYPE_CHECKING:
    from agent.contract import DesiredState
    from agent.trust.client import BundleClient

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_BROKER_SOURCE",
    "AgentConfig",
    "AgentDaemon",
    "fleet_silence",
    "platform_info",
]

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


DEFAULT_MAX_BUNDLE_BYTES = 512 * 1024 * 1024
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_BROKER_SOURCE = "default"
# A heartbeat older than this says nothing useful: it expires in the outbox and the broker.
HEARTBEAT_EXPIRY_S = 24 * 3600
# How long `edge-agent rollback` waits for the daemon: loading and checking the model.
ROLLBACK_REPLY_TIMEOUT_S = 120.0


def fleet_silence(
    *, enrolled: bool, heard: bool, has_desired: bool, connected_for_s: float, after_s: float,
) -> tuple[int, str] | None:
    """What to log when a connected agent has heard nothing from a fleet (level, text).

    Nothing once a desired state came (now or in an earlier run), or before ``after_s`` of
    connection. Not enrolled: a WARNING, this device cannot be any fleet's. Enrolled: an
    INFO, since a fleet sends nothing until its first deployment to the device."""
    if heard or has_desired or connected_for_s < after_s:
        return None
    waited = f"connected for {connected_for_s:.0f} s and no fleet has sent this device anything"
    if not enrolled:
        return logging.WARNING, (
            f"{waited}, and it is not enrolled: enroll it with its fleet "
            "(`edge-agent enroll --fleet URL`), which also names the fleet's broker; a device "
            "on another broker never appears in `edge-fleet devices list`"
        )
    return logging.INFO, (
        f"{waited} yet: normal until its first deployment; if `edge-fleet devices list` does "
        "not show this device, this broker is not its fleet's"
    )


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerAddress
    device_id: str
    state_dir: Path
    interval_s: float = 10.0
    keepalive_s: int = 15
    # Reconnects drawn at random over their backoff window (agent.mqtt.Backoff); off only
    # to compare with the plain doubling (bench/reconnect.py).
    reconnect_jitter: bool = True
    fleet_url: str | None = None  # default: the URL given at enrollment
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    retry_initial_s: float = 5.0
    retry_max_s: float = 600.0
    # Local inference endpoint: a TCP address, a Unix socket, or neither (None, None).
    listen: tuple[str, int] | None = ("127.0.0.1", 8470)
    socket_path: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    outbox_bytes: int = 64 * 1024 * 1024
    outbox_rate: float = 200.0  # messages per second while draining a backlog
    engine: EngineOptions = field(default_factory=EngineOptions)  # providers, threads
    download: DownloadLimits = field(default_factory=DownloadLimits)  # deadline, floor
    broker_source: str = "--broker"  # where the broker address came from, for the logs
    fleet_silence_s: float = 60.0  # connected this long with no word from a fleet: say so
    # The device's own labels (`--label site=berlin`), reported in every ReportedState;
    # checked against the contract's bounds before they get here (agent.labels).
    labels: Mapping[str, str] = field(default_factory=dict)
    # STATE_DIR/agent.sock for `edge-agent rollback` / `status`; off for simulated devices.
    control_socket: bool = True
    # Drift windows of the serving bundle (agent.drift.window): closed after this long,
    # counting at most this many rows a second (None: every row).
    drift_window_s: float = DEFAULT_WINDOW_S
    drift_sample_rate: float | None = DEFAULT_SAMPLE_RATE


class AgentDaemon:
    def __init__(self, config: AgentConfig, stats: InferenceStats | None = None) -> None:
        self.config = config
        self.stats = stats or InferenceStats()
        self.state = AgentState(config.state_dir)
        self.outbox = Outbox(config.state_dir / "outbox.db", config.outbox_bytes)
        self._sampler = ProcessSampler()
        self._platform = platform_info()
        self._fleet_url = config.fleet_url or self.state.fleet_url
        self._bundle_client: BundleClient | None = None
        self.installer = Installer(
            config.state_dir, self.client, self._event, config.max_bundle_bytes,
            engine_options=config.engine,
        )
        if not self.installer.slots.try_lock():
            raise SlotsBusyError(
                f"another edge-agent is running with state directory {config.state_dir}"
            )
        self.host = ModelHost(self.stats, DriftWindow(
            window_s=config.drift_window_s, sample_rate=config.drift_sample_rate))
        self.reconciler = Reconciler(
            self.state, self.installer, emit=self._event, current=lambda: self.host.current,
            on_swap=self._swap_model, retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
        )
        self.labels: dict[str, str] = dict(config.labels)
        self.control: ControlServer | None = None
        if config.control_socket:
            self.control = ControlServer(
                socket_path(config.state_dir),
                {"rollback": self._control_rollback, "status": self._control_status},
            )
        # Bound here, so a taken port is an error at start-up, not a dead thread later.
        self.endpoint: InferenceEndpoint | None = None
        if config.listen is not None or config.socket_path is not None:
            self.endpoint = InferenceEndpoint(
                self.host,
                address=config.listen if config.socket_path is None else None,
                socket_path=config.socket_path,
                max_request_bytes=config.max_request_bytes,
            )
        # Desired-state payloads go to the intake thread: verification may refresh TUF
        # metadata, which may not run in paho's network thread.
        self._work: queue.Queue[bytes | None] = queue.Queue()
        self._worker = threading.Thread(target=self._intake_loop, name="intake", daemon=True)
        self._stop = threading.Event()
        self._heard_from_fleet = threading.Event()  # a desired message came in this run
        self._silence_noted = False
        self._connected_since: float | None = None
        self._publish_lock = threading.Lock()
        # The connection id is the seq reserved for that connection's Last Will.
        self._armed_connection = 0
        self._connection = 0
        self.drainer = OutboxDrainer(
            self.outbox, self._publish_pending, lambda: self.link.connected,
            rate=config.outbox_rate,
        )
        self.link = MqttLink(
            config.broker,
            client_id=f"edgefleet-agent-{config.device_id}",
            on_message=self._on_message,
            on_connect=self._on_connect,
            will_factory=self._next_will,
            keepalive=config.keepalive_s,
            on_published=self.drainer.acknowledged,
            backoff=Backoff(spread_s=max(1, config.keepalive_s), jitter=config.reconnect_jitter),
        )

    def client(self) -> BundleClient | None:
        """The TUF client, built (and TUF imported) on first use: an idle agent serving its
        model does not carry the update machinery in memory."""
        if self._bundle_client is None and self._fleet_url:
            from agent.trust.client import BundleClient

            self._bundle_client = BundleClient(
                self._fleet_url, self.config.state_dir,
                max_bundle_bytes=self.config.max_bundle_bytes,
                limits=self.config.download,
            )
        return self._bundle_client

    def _topic(self, channel: Channel) -> str:
        return topic(self.config.device_id, channel)

    def _envelope(self) -> dict:
        return {
            "device_id": self.config.device_id,
            "seq": self.state.next_seq(),
            "sent_at": utcnow(),
            "incarnation": self.state.incarnation,
        }

    def _next_will(self) -> Will:
        seq = self.state.next_seq()
        self._armed_connection = seq
        offline = StatusMessage(
            device_id=self.config.device_id,
            seq=seq,
            sent_at=utcnow(),
            incarnation=self.state.incarnation,
            state="offline",
            connection=seq,
        )
        return Will(self._topic(Channel.STATUS), encode(offline))

    def _status(self, state: str) -> StatusMessage:
        return StatusMessage(**self._envelope(), state=state, connection=self._connection)

    def _reported(self) -> ReportedState:
        desired = self.state.desired()
        model = self.host.current
        return ReportedState(
            **self._envelope(),
            agent_version=__version__,
            active_model=ActiveModel(name=model.manifest.name, version=model.manifest.version)
            if model
            else None,
            platform=self._platform,
            desired_generation=desired.generation if desired else None,
            desired_bundle=desired.bundle if desired else None,
            labels=dict(self.labels),
        )

    def _publish(self, channel: Channel, message, *, retain: bool = False) -> None:
        with self._publish_lock:
            self.link.publish(self._topic(channel), encode(message), qos=1, retain=retain)

    def _event(self, event: str, **detail) -> None:
        """Events go through the outbox: a deployment step is never lost to an outage."""
        log.info("event %s %s", event, detail)
        message = EventMessage(**self._envelope(), event=event, detail=fit_detail(detail))
        self.outbox.put(message.seq, Channel.EVENTS.value, encode(message))

    def _publish_pending(self, pending: Pending, expiry_s: float | None) -> int:
        info = self.link.publish(
            self._topic(Channel(pending.channel)),
            pending.payload,
            qos=1,
            expiry_s=max(1, int(expiry_s)) if expiry_s is not None else None,
        )
        return info.mid

    def _publish_reported(self) -> None:
        self._publish(Channel.REPORTED, self._reported(), retain=True)

    def _on_connect(self) -> None:
        self._connection = self._armed_connection
        self.link.subscribe(self._topic(Channel.DESIRED), qos=1)
        self._publish(Channel.STATUS, self._status("online"), retain=True)
        self._publish(Channel.REPORTED, self._reported(), retain=True)

    def _on_message(self, message: Inbound) -> None:
        if message.topic != self._topic(Channel.DESIRED):
            log.warning("ignoring a message on unexpected topic %s", message.topic)
            return
        self._heard_from_fleet.set()
        if message.payload:  # an empty retained payload clears the desired state
            self._work.put(message.payload)

    # ---------------------------------------------------------------- the intake

    def _intake_loop(self) -> None:
        """Verify and accept desired states; the reconciler acts on them."""
        while (payload := self._work.get()) is not None:
            try:
                accepted = self._accept_desired(payload)
            except Exception:  # the intake must outlive any bug
                log.exception("desired-state intake failed")
                continue
            if accepted is not None:
                self.reconciler.desired_changed(accepted)

    def _accept_desired(self, payload: bytes) -> DesiredState | None:
        """The desired state in ``payload`` if it is new and verified; None otherwise."""
        try:
            envelope, raw_signed = decode_desired(self.config.device_id, payload)
            self._verify_desired(envelope, raw_signed)
            desired = envelope.signed
            current = self.state.desired()
            if current is not None and desired.generation == current.generation:
                return None  # the retained copy, seen again after a reconnect
            if not self.state.accept_desired(desired):
                raise StaleDesiredStateError(
                    f"refused desired generation {desired.generation}: generation "
                    f"{current.generation if current else 0} was already accepted"
                )
        except MessageRejected as exc:
            reason = "unsigned_desired_state" if exc.reason == "unsigned" else exc.reason
            log.warning("refused desired state: %s", exc)
            self._event("desired_rejected", reason=reason, detail=exc.detail)
            return None
        except UpdateError as exc:
            log.warning("refused desired state: %s", exc)
            self._event("desired_rejected", reason=exc.reason, detail=str(exc))
            return None
        bundle = to_data(desired.bundle) if desired.bundle else None
        log.info("accepted desired generation %d: bundle %s", desired.generation, bundle)
        self._event("desired_received", generation=desired.generation, bundle=bundle)
        self._publish_reported()
        return desired

    def _verify_desired(self, envelope, raw_signed: dict) -> None:
        from agent.trust.desired import verify_desired

        client = self.client()
        if client is None or not client.enrolled:
            raise UnsignedDesiredStateError(
                "not enrolled: no trusted root to check desired-state signatures against"
            )
        try:
            verify_desired(envelope, raw_signed, client.director_keys())
        except UnsignedDesiredStateError:
            # Perhaps the director key was rotated: refresh the trusted root, try once more.
            try:
                client.refresh()
            except TrustError as exc:
                log.warning("metadata refresh failed: %s", exc)
                raise
            verify_desired(envelope, raw_signed, client.director_keys())

    def _swap_model(self, new: LoadedModel) -> None:
        """Requests in flight finish on the old engine; new ones go to ``new``."""
        self.host.swap(new, self._drift_plan(new))
        release_free_memory()
        if self.link.connected:
            self._publish_reported()

    def _drift_plan(self, model: LoadedModel) -> DriftPlan | None:
        """The bundle's baseline matched to its tensors, or None (no baseline, or one this
        agent cannot use: the model serves all the same, and the fleet is told why)."""
        try:
            plan = load_drift_plan(self.installer.slots.path(model.slot), model.manifest)
        except BaselineError as exc:
            log.warning("drift tracking off for %s v%d: %s", model.manifest.name,
                        model.manifest.version, exc)
            self._event("drift_unavailable", model=to_data(model.manifest.ref), error=str(exc))
            return None
        if plan is not None:
            log.info("drift tracking %d features of %s v%d", len(plan.features),
                     model.manifest.name, model.manifest.version)
        return plan

    def _queue_drift(self, reports: list[WindowReport]) -> None:
        """Closed drift windows go through the outbox like events: a window is history the
        fleet keeps, so an outage delays it, never loses it."""
        for report in reports:
            for message in report.messages(self.config.device_id, self.state.next_seq):
                message = msgspec.structs.replace(message, incarnation=self.state.incarnation)
                self.outbox.put(message.seq, Channel.DRIFT.value, encode(message))
            log.debug("queued drift window of %s v%d: %d rows, %d binned (%s)",
                      report.model.name, report.model.version, report.rows, report.binned,
                      report.reason)

    def _control_rollback(self) -> dict:
        """``edge-agent rollback``, asked over the control socket."""
        reply = self.reconciler.request_rollback()
        try:
            record = reply.result(timeout=ROLLBACK_REPLY_TIMEOUT_S)
        except UpdateError as exc:
            return {"ok": False, "reason": exc.reason, "error": str(exc)}
        except FutureTimeout:
            return {"ok": False, "reason": "timeout",
                    "error": f"no answer from the agent within {ROLLBACK_REPLY_TIMEOUT_S:.0f}s"}
        return {"ok": True, **record.event_detail()}

    def _control_status(self) -> dict:
        """``edge-agent status``: what only the running daemon knows."""
        current = self.host.current
        return {
            "ok": True,
            "pid": os.getpid(),
            "device_id": self.config.device_id,
            "broker": str(self.config.broker),
            "connected": self.link.connected,
            "serving": to_data(current.manifest.ref) if current else None,
        }

    def _check_fleet_silence(self) -> None:
        """Once per run: say so when connected and nothing ever came from a fleet."""
        if self._silence_noted:
            return
        if not self.link.connected:
            self._connected_since = None
            return
        now = time.monotonic()
        if self._connected_since is None:
            self._connected_since = now
        said = fleet_silence(
            enrolled=is_enrolled(self.config.state_dir),
            heard=self._heard_from_fleet.is_set(),
            has_desired=self.state.desired() is not None,
            connected_for_s=now - self._connected_since,
            after_s=self.config.fleet_silence_s,
        )
        if said is not None:
            self._silence_noted = True
            log.log(said[0], "%s (broker %s)", said[1], self.config.broker)

    def heartbeat(self) -> HeartbeatTelemetry:
        sample = self._sampler.sample()
        outbox = self.outbox.stats()
        return HeartbeatTelemetry(
            **self._envelope(),
            uptime_s=sample.uptime_s,
            cpu_percent=sample.cpu_percent,
            rss_mb=sample.rss_mb,
            **self.stats.snapshot(),
            outbox_depth=outbox.depth,
            outbox_dropped=outbox.dropped,
        )

    def _queue_heartbeat(self) -> None:
        beat = self.heartbeat()
        self.outbox.put(beat.seq, Channel.TELEMETRY.value, encode(beat), HEARTBEAT_EXPIRY_S)
        log.debug("queued telemetry seq %d", beat.seq)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Block until :meth:`stop`; survives any number of broker outages.

        Under systemd (``Type=notify``) the loop says when it is ready and pings the
        watchdog after each turn (:mod:`agent.sd_notify`): a hung loop gets restarted."""
        notifier = Notifier()
        self.start()
        notifier.ready(self._service_status())
        pulse = notifier.pulse_s(self.config.interval_s)
        next_tick = time.monotonic() + self.config.interval_s
        try:
            while not self._stop.wait(pulse):
                if time.monotonic() + 0.001 >= next_tick:
                    self.tick()
                    next_tick = time.monotonic() + self.config.interval_s
                notifier.alive(self._service_status())
            notifier.stopping()
        finally:
            self.shutdown()

    def _service_status(self) -> str:
        """One line for ``systemctl status``."""
        link = "connected to" if self.link.connected else "NOT connected to"
        current = self.host.current
        model = (f"serving {current.manifest.name} v{current.manifest.version}" if current
                 else "no model installed")
        return f"{link} {self.config.broker}; {model}"

    def start(self) -> None:
        """Connect, load the active model and start the device's threads; returns at once.

        :meth:`run` is ``start``, then :meth:`tick` every interval, then :meth:`shutdown`;
        the device simulator calls the three itself, so many devices share one clock
        thread instead of a main loop each."""
        log.info(
            "agent %s starting: device %s, broker %s (%s), state %s",
            __version__,
            self.config.device_id,
            self.config.broker,
            self.config.broker_source,
            self.config.state_dir,
        )
        self.state.put("device_id", self.config.device_id)  # for `edge-agent status`
        self._warn_about_set_up()
        if self.endpoint is not None:
            self.endpoint.start()
        self.link.start()  # publishes made before the connection is up are queued
        # Still the only thread to touch the slots: the reconciler starts below.
        loaded = self.installer.load_active()
        if loaded is not None:
            log.info("serving %s v%d from slot %s", loaded.manifest.name,
                     loaded.manifest.version, loaded.slot)
            self._swap_model(loaded)
        current = self.host.current
        self._event(
            "started",
            agent_version=__version__,
            model=to_data(current.manifest.ref) if current else None,
        )
        self.reconciler.start()
        self._worker.start()
        if self.control is not None:
            self.control.start()
        self.drainer.start()

    def tick(self) -> None:
        """What the main loop does every interval: checks, then queue a heartbeat."""
        self._check_fleet_silence()
        self.reconciler.follow_disk()
        self._queue_drift(self.host.drift.poll())
        self._queue_heartbeat()  # also while offline: the outbox keeps it

    def set_labels(self, labels: Mapping[str, str]) -> None:
        """New labels (already checked): reported at once when connected."""
        if dict(labels) == self.labels:
            return
        self.labels = dict(labels)
        if self.link.connected:
            self._publish_reported()

    def _warn_about_set_up(self) -> None:
        """Loudly, at start-up: what keeps this agent from working as a fleet's device."""
        state_dir = self.config.state_dir
        if self.config.broker_source == DEFAULT_BROKER_SOURCE:
            log.warning(
                "no broker given (--broker, EDGE_AGENT_BROKER) and none learnt at enrollment: "
                "trying %s, which may not be the fleet's", self.config.broker,
            )
        if not is_enrolled(state_dir):
            log.warning(
                "NOT ENROLLED: this agent trusts no fleet and refuses every deployment "
                "(desired_rejected unsigned_desired_state). Enroll it once: "
                "edge-agent enroll --fleet http://FLEET:8000 --state-dir %s", state_dir,
            )
        elif self._fleet_url is None:
            log.warning("enrolled, but no fleet URL is known to fetch bundles from: "
                        "give --fleet URL or enroll again with --force")

    def shutdown(self) -> None:
        """A clean stop: the backlog gets a moment, the fleet is told offline."""
        self._stop_threads()
        self._queue_drift(self.host.drift.close())  # the window so far, not lost
        if self.link.connected:  # give the backlog a moment to reach the broker
            deadline = time.monotonic() + 2
            while self.outbox.stats().depth and time.monotonic() < deadline:
                time.sleep(0.05)
        self.drainer.stop()
        if self.link.connected:
            info = self.link.publish(
                self._topic(Channel.STATUS), encode(self._status("offline")), qos=1, retain=True
            )
            # If the broker went away meanwhile, the Last Will says offline instead.
            with contextlib.suppress(RuntimeError):
                info.wait_for_publish(timeout=3)
        self.link.close()
        self._release()
        log.info("agent stopped")

    def abandon(self) -> None:
        """Stop as a crash or power cut would, as far as anyone outside can tell: no
        goodbye, the broker publishes this connection's Last Will, what the outbox holds
        stays on disk for the next start. (The device simulator's crash; files are closed
        so the same state directory can be opened again in this process.)"""
        self.link.drop()
        self._stop_threads()
        self.drainer.stop()
        self.link.close()
        self._release()
        log.warning("agent %s abandoned (simulated crash)", self.config.device_id)

    def _stop_threads(self) -> None:
        if self.control is not None:
            self.control.stop()
        self._work.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout=5)
        self.reconciler.stop()  # cancels an install in progress: it resumes at the next start

    def _release(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
        self.host.close()
        self.outbox.close()
        self.state.close()
        self.installer.slots.unlock()
