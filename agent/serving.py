"""The model currently serving, swappable under load without failing a request.

Invariant: a request runs entirely on the engine it leased; :meth:`ModelHost.swap` points new
leases at the new model at once, and the old engine is closed only when its last in-flight
request returns. So an update or rollback never fails, truncates or mixes a request, and the
switch is visible as one clean change of the version in responses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from agent.contract import to_data
from agent.installer import LoadedModel
from agent.runtime.engine import InputData, InputError
from agent.stats import InferenceStats

__all__ = ["ModelHost", "NoModelError"]


class NoModelError(RuntimeError):
    """No model is installed yet (or the installed one failed verification)."""


class _Lease:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.inflight = 0
        self.retired = False


class ModelHost:
    def __init__(self, stats: InferenceStats | None = None) -> None:
        self.stats = stats or InferenceStats()
        self._lock = threading.Lock()
        self._current: _Lease | None = None

    @property
    def current(self) -> LoadedModel | None:
        lease = self._current
        return lease.model if lease else None

    def swap(self, model: LoadedModel | None) -> None:
        """Serve ``model`` from now on; the previous engine closes once it is idle."""
        with self._lock:
            old = self._current
            if old is not None and model is not None and old.model is model:
                return
            self._current = _Lease(model) if model is not None else None
            # p50/p95 from here on describe the new model alone: a rollout's latency gate
            # compares them with the previous version's on the same device.
            self.stats.restart_latencies()
            close_now = old is not None and old.inflight == 0
            if old is not None:
                old.retired = True
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
        return outputs, model

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
