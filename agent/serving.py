"""The model currently serving, swappable under load without failing a request.

Invariant: a request runs entirely on the engine it leased; :meth:`ModelHost.swap` points new
leases at the new model at once, and the old engine is closed only when its last in-flight
request returns. So an update or rollback never fails, truncates or mixes a request, and the
switch is visible as one clean change of the version in responses.

Every answered request is also shown to the drift window (:mod:`agent.drift.window`), which
counts the serving bundle's inputs and outputs on its baseline's bins; the window moves to
the new bundle's plan when the model is swapped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from agent.contract import to_data
from agent.drift.plan import DriftPlan
from agent.drift.window import DriftWindow
from agent.installer import LoadedModel
from agent.runtime.engine import InputData, InputError, TensorSpec, prepare_inputs
from agent.stats import InferenceStats

__all__ = ["ModelHost", "NoModelError"]


class NoModelError(RuntimeError):
    """No model is installed yet (or the installed one failed verification)."""


class _Lease:
    def __init__(self, model: LoadedModel, tracked: bool) -> None:
        self.model = model
        self.inflight = 0
        self.retired = False
        self.tracked = tracked  # the drift window counts this model's requests
        self.inputs = model.engine.inputs if tracked else []  # read once, not per request


class ModelHost:
    def __init__(
        self, stats: InferenceStats | None = None, drift: DriftWindow | None = None
    ) -> None:
        self.stats = stats or InferenceStats()
        self.drift = drift or DriftWindow()
        self._lock = threading.Lock()
        self._current: _Lease | None = None

    @property
    def current(self) -> LoadedModel | None:
        lease = self._current
        return lease.model if lease else None

    def swap(self, model: LoadedModel | None, drift_plan: DriftPlan | None = None) -> None:
        """Serve ``model`` from now on; the previous engine closes once it is idle.

        ``drift_plan`` (the new bundle's baseline, matched to its tensors) starts a new
        drift window: the current one closes as the old bundle's. A request of the old
        model that finishes after the swap is not counted for the new one (its lease is
        no longer current)."""
        with self._lock:
            old = self._current
            if old is not None and model is not None and old.model is model:
                return
            if old is not None:
                old.tracked = False  # before the window moves on: see infer()
            self._current = _Lease(model, drift_plan is not None) if model is not None else None
            # p50/p95 from here on describe the new model alone: a rollout's latency gate
            # compares them with the previous version's on the same device.
            self.stats.restart_latencies()
            close_now = old is not None and old.inflight == 0
            if old is not None:
                old.retired = True
        self.drift.reset(drift_plan if model is not None else None)
        if close_now:
            old.model.engine.close()

    @contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        """The current model, kept open (even if swapped out) until the block ends."""
        lease = self._acquire()
        try:
            yield lease.model
        finally:
            self._release(lease)

    def infer(self, data: InputData) -> tuple[dict[str, np.ndarray], LoadedModel]:
        """Run one request on the current model; latency and errors go into ``stats``.

        :meth:`lease` spelled out: a generator-based context manager costs microseconds
        on every request (see ``Engine.infer`` on code that runs between inferences)."""
        lease = self._acquire()
        model = lease.model
        started = time.perf_counter()
        try:
            outputs = model.engine.infer(data)
        except InputError:  # the caller's mistake, not the model's
            self.stats.record_client_error()
            raise
        except Exception:
            self.stats.record(time.perf_counter() - started, ok=False)
            raise
        else:
            self.stats.record(time.perf_counter() - started)
        finally:
            self._release(lease)
        if lease.tracked:
            self._observe(lease.inputs, data, outputs)
        return outputs, model

    def _observe(self, specs: list[TensorSpec], data: InputData,
                 outputs: dict[str, np.ndarray]) -> None:
        """Show an answered request to the drift window, as the engine ran it (batch
        first). The common request, one batched array for a one-input model, is passed
        as it is; anything else (a single sample, lists, a mapping) is prepared again as
        the engine prepared it, which only the already slower requests pay."""
        if (type(data) is np.ndarray and len(specs) == 1
                and data.ndim == len(specs[0].shape)):
            feeds: Mapping[str, np.ndarray] = {specs[0].name: data}
        elif isinstance(data, Mapping) and len(data) == len(specs) and all(
                type(data.get(spec.name)) is np.ndarray
                and data[spec.name].ndim == len(spec.shape) for spec in specs):
            feeds = data  # arrays by name, batch first: as the engine ran them
        else:
            try:
                feeds = prepare_inputs(specs, data)
            except InputError:  # it ran, so this does not happen; never fail a request
                return
        self.drift.observe(feeds, outputs)

    def _acquire(self) -> _Lease:
        with self._lock:
            lease = self._current
            if lease is None:
                raise NoModelError("no model is installed on this device yet")
            lease.inflight += 1
        return lease

    def _release(self, lease: _Lease) -> None:
        with self._lock:
            lease.inflight -= 1
            close_now = lease.retired and lease.inflight == 0
        if close_now:
            lease.model.engine.close()

    def describe(self) -> dict[str, Any] | None:
        model = self.current
        if model is None:
            return None
        manifest = model.manifest
        return {
            "name": manifest.name,
            "version": manifest.version,
            "runtime": manifest.runtime,
            "slot": model.slot,
            "inputs": [to_data(spec) for spec in manifest.inputs],
            "outputs": [to_data(spec) for spec in manifest.outputs],
            "metadata": dict(manifest.metadata),
        }

    def close(self) -> None:
        self.swap(None)
