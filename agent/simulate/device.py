"""One simulated device: an :class:`~agent.daemon.AgentDaemon` with faults injected.

Everything a real agent does runs as it does there: the wire contract, the durable outbox,
the director-signature check of desired states, the TUF client and the streaming download,
the A/B slots, the install-time health check and the engine on the real runtime. What the
simulator adds sits at three named points only:

* :attr:`agent.installer.Installer.fault`: after the real health check passed, an injected
  ``health_check_failed``; after the slots switched, an injected crash;
* :class:`FaultyEngine` wraps the engine the device serves with: injected latency (slept
  inside the timed call, so heartbeats report it as measured) and model errors at a rate;
* :meth:`agent.mqtt.MqttLink.drop` / ``resume``: off the network, Last Will and all.

A crash ends the daemon without a goodbye (:meth:`AgentDaemon.abandon`) and starts a new
one on the same state directory, as a restarted process would: seq, accepted desired
state, slots and outbox come back from disk.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.contract import BundleManifest
from agent.daemon import AgentConfig, AgentDaemon
from agent.errors import HealthCheckError
from agent.installer import LoadedModel
from agent.runtime.engine import EngineError
from agent.serving import NoModelError
from agent.simulate.faults import DeviceFaults

__all__ = ["FaultyEngine", "InjectedModelError", "SimDevice", "SimulatedCrash"]

log = logging.getLogger(__name__)


MAX_INPUTS_BYTES = 256 * 1024 * 1024  # an inputs file of the fault file, read once

# A request no model takes: an input name the bundle does not have.
_MALFORMED = {"not-an-input-of-this-model": np.zeros((1,), dtype=np.float32)}


class SimulatedCrash(BaseException):
    """Unwinds the reconciler's thread the way a process death would end it: no handler
    of the agent's (they catch ``Exception``) reports it as a failed install."""


class InjectedModelError(EngineError):
    """A model (runtime) error injected by the simulator: counted as an error, not a
    client error, exactly as a runtime failure on a valid request is."""


class FaultyEngine:
    """The device's real engine, with the latency and error faults in force applied."""

    def __init__(self, engine: Any, faults: Callable[[], DeviceFaults]) -> None:
        self._engine = engine
        self._faults = faults

    def infer(self, data: Any) -> Any:
        faults = self._faults()
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000.0)
        if faults.error_rate and random.random() < faults.error_rate:
            raise InjectedModelError("injected model error (simulator fault error_rate)")
        return self._engine.infer(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _SimAgent(AgentDaemon):
    """The daemon, serving its models through :class:`FaultyEngine`."""

    faults_at: Callable[[int | None], DeviceFaults]

    def _drift_plan(self, model: LoadedModel):
        """Drift is tracked only on a device fed real rows (its faults' ``inputs`` when the
        model is loaded): the default load repeats one sample, which is no distribution,
        and counting it would only add work to every simulated request."""
        if not self.faults_at(model.manifest.version).inputs:
            return None
        return super()._drift_plan(model)

    def _swap_model(self, new: LoadedModel) -> None:
        if not isinstance(new.engine, FaultyEngine):
            version = new.manifest.version
            new = LoadedModel(new.slot, new.manifest, FaultyEngine(
                new.engine, lambda: self.faults_at(version)))
        super()._swap_model(new)


class SimDevice:
    """One virtual device: its id, state directory, broker and the daemon now running."""

    def __init__(
        self,
        config: AgentConfig,
        faults_at: Callable[[int | None], DeviceFaults],
        *,
        on_crash: Callable[[SimDevice], None],
        base_labels: dict[str, str],
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.faults_at = faults_at  # the faults in force for a bundle version
        self.base_labels = base_labels
        self._on_crash = on_crash
        self.daemon: _SimAgent | None = None
        self.starts = 0
        self.crashes = 0
        self.offline = False
        self.busy = threading.Lock()  # one heartbeat (or restart) of a device at a time
        self._inputs: tuple[tuple[int, str | None], dict[str, np.ndarray]] | None = None

    @property
    def faults(self) -> DeviceFaults:
        """The faults in force for the bundle serving now."""
        daemon = self.daemon
        current = daemon.host.current if daemon is not None else None
        return self.faults_at(current.manifest.version if current is not None else None)

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def labels(self) -> dict[str, str]:
        return {**self.base_labels, **self.faults.labels}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        daemon = _SimAgent(self.config)
        daemon.faults_at = self.faults_at
        daemon.set_labels(self.labels())
        daemon.installer.fault = self._install_fault
        if self.config.fleet_url:
            daemon.state.put("fleet_url", self.config.fleet_url)  # as enrollment stores it
        self.daemon = daemon
        self.starts += 1
        # The daemon's threads carry the device id, so the log says whose line it is.
        for thread in (daemon._worker, daemon.reconciler._thread, daemon.drainer._thread):
            thread.name = f"{self.device_id}/{thread.name}"
        daemon.start()
        self.offline = False
        if self.faults.offline:
            self.go_offline()

    def stop(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.shutdown()

    def restart_after_crash(self, delay_s: float) -> None:
        """The crashed daemon is gone for good; a new one starts on the same state."""
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.abandon()
        time.sleep(delay_s)
        self.start()
        log.warning("%s restarted after a simulated crash", self.device_id)

    def _install_fault(self, point: str, manifest: BundleManifest) -> None:
        """Installer hook (the reconciler's thread)."""
        faults = self.faults_at(manifest.version)
        if point == "health_check" and faults.fail_health_check:
            raise HealthCheckError(
                f"injected fault: {manifest.name} v{manifest.version} declared unhealthy "
                "by the simulator (fail_health_check)"
            )
        if point == "switched" and faults.crash_after_install:
            self.crashes += 1
            log.warning("%s crashes after installing %s v%d (simulated)", self.device_id,
                        manifest.name, manifest.version)
            self._on_crash(self)
            raise SimulatedCrash(self.device_id)

    # ------------------------------------------------------------------ faults

    def apply(self) -> None:
        """Faults changed: latency and errors apply at the next inference by themselves;
        going offline or coming back and labels are done here."""
        daemon = self.daemon
        if daemon is None:
            return
        faults = self.faults
        daemon.set_labels(self.labels())
        if faults.offline and not self.offline:
            self.go_offline()
        elif not faults.offline and self.offline:
            self.come_back()

    def go_offline(self) -> None:
        if self.daemon is not None:
            log.warning("%s goes offline (simulated)", self.device_id)
            self.daemon.link.drop()
            self.offline = True

    def come_back(self) -> None:
        if self.daemon is not None:
            log.warning("%s comes back online (simulated)", self.device_id)
            self.daemon.link.resume()
            self.offline = False

    # ------------------------------------------------------------------ the clock

    def beat(self, inferences: int) -> None:
        """One heartbeat interval: the synthetic load on the active model, then the
        daemon's own tick (checks and the heartbeat, which reports the load's figures)."""
        daemon = self.daemon
        if daemon is None:
            return
        self._load(daemon, inferences)
        daemon.tick()

    def _load(self, daemon: AgentDaemon, count: int) -> None:
        model = daemon.host.current
        if model is None or count <= 0:
            return
        faults = self.faults_at(model.manifest.version)
        inputs = self._inputs_for(daemon, model, faults.inputs)
        if inputs is None:
            return
        rows = min(len(value) for value in inputs.values())
        for _ in range(count):
            if faults.client_error_rate and random.random() < faults.client_error_rate:
                request = _MALFORMED  # the engine refuses it: counted as a client error
            elif rows > 1:
                if faults.batch > 1:
                    pick = np.random.randint(rows, size=faults.batch)
                    request = {name: value[pick] for name, value in inputs.items()}
                else:
                    row = random.randrange(rows)
                    request = {name: value[row : row + 1] for name, value in inputs.items()}
            else:
                request = inputs
            # Model and client errors are counted by the host; no model (swapped out):
            # nothing to count.
            with contextlib.suppress(EngineError, NoModelError):
                daemon.host.infer(request)

    def _inputs_for(
        self, daemon: AgentDaemon, model: LoadedModel, path: str | None
    ) -> dict[str, np.ndarray] | None:
        """What the load draws its requests from: the fault's ``inputs`` file, else the
        first row of the bundle's own health-check samples (real inputs the model was
        built for), else zeros shaped by its input schema."""
        key = (id(model), path)
        if self._inputs is not None and self._inputs[0] == key:
            return self._inputs[1]
        inputs = self._read_inputs(model, Path(path)) if path else None
        spec = model.manifest.health_check
        if inputs is None and spec is not None:
            from agent.health import load_samples

            try:
                samples, _ = load_samples(daemon.installer.slots.path(model.slot) / spec.file)
                inputs = {name: np.ascontiguousarray(value[:1]) for name, value in samples.items()}
            except Exception as exc:
                log.warning("%s: samples unreadable for the load (%s): using zeros",
                            self.device_id, exc)
        if not inputs:
            inputs = {
                t.name: np.zeros([d if d else 1 for d in t.shape], dtype=t.dtype)
                for t in model.manifest.inputs
            }
        self._inputs = (key, inputs)
        return inputs

    def _read_inputs(self, model: LoadedModel, path: Path) -> dict[str, np.ndarray] | None:
        """The ``inputs`` file, as arrays named by the model's inputs; None (logged) when
        it cannot be read or does not fit the model."""
        from agent.npy import NpyError, load_array_body

        try:
            loaded = load_array_body(path.read_bytes(), MAX_INPUTS_BYTES)
        except (OSError, NpyError) as exc:
            log.error("%s: inputs file %s unreadable (%s): using the default load",
                      self.device_id, path, exc)
            return None
        names = [t.name for t in model.manifest.inputs]
        arrays = loaded if isinstance(loaded, dict) else {names[0]: loaded}
        if sorted(arrays) != sorted(names) or any(
                value.ndim == 0 or not len(value) for value in arrays.values()):
            log.error("%s: inputs file %s holds %s, the model takes %s (batch first): "
                      "using the default load", self.device_id, path, sorted(arrays), names)
            return None
        return {name: np.ascontiguousarray(value) for name, value in arrays.items()}
