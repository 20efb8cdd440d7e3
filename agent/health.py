"""The install-time health check: the device must reproduce the outputs recorded at build.

The check is also the model's warm-up (a bundle without samples gets a plain
:meth:`~agent.runtime.Engine.warmup`): the first request after a swap must not be the one
that pays for the runtime's lazy initialisation.

Samples live in the bundle as ``samples.npz`` with keys ``input:<name>`` and
``expected:<name>``, deflated (bundles built before were stored; both are read). A model
that fails to load, raises, or differs beyond the manifest's tolerance is refused before it
ever serves a request.

The samples are the bundle's bytes, hence untrusted input. They are read by the endpoint's
bounded reader (:func:`agent.npy.load_npz`): stored or deflated members only, no more than
:data:`~agent.contract.MAX_SAMPLES_BYTES` declared in all and never inflated past what a
member declares, and no array allocated beyond what its member holds. Whatever is wrong
with them (a corrupt zip, a bad CRC, an array header out of bounds, values that cannot be
compared) is translated here into :class:`HealthCheckError`, which is final: the same
bytes fail the same way on every try.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from agent.contract import (
    MAX_SAMPLES_BYTES,
    SAMPLE_EXPECTED_PREFIX,
    SAMPLE_INPUT_PREFIX,
    BundleManifest,
)
from agent.errors import HealthCheckError
from agent.npy import load_npz
from agent.runtime import Engine, EngineError, load_engine

__all__ = [
    "EXPECTED_PREFIX",
    "INPUT_PREFIX",
    "MAX_SAMPLES_BYTES",
    "load_samples",
    "open_checked_engine",
]

log = logging.getLogger(__name__)

INPUT_PREFIX = SAMPLE_INPUT_PREFIX
EXPECTED_PREFIX = SAMPLE_EXPECTED_PREFIX


def load_samples(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs and expected outputs by tensor name. The file's size was checked against the
    manifest (itself bounded) before this runs; what it inflates to is bounded here."""
    data = load_npz(path.read_bytes(), MAX_SAMPLES_BYTES)
    inputs = {k[len(INPUT_PREFIX) :]: v for k, v in data.items() if k.startswith(INPUT_PREFIX)}
    expected = {
        k[len(EXPECTED_PREFIX) :]: v for k, v in data.items() if k.startswith(EXPECTED_PREFIX)
    }
    return inputs, expected


def _check(engine: Engine, manifest: BundleManifest, slot: Path) -> None:
    spec = manifest.health_check
    if spec is None:  # nothing to compare with; still run it once before it serves
        _warm_up(engine)
        return
    try:
        inputs, expected = load_samples(slot / spec.file)
    except Exception as exc:  # untrusted bytes: zipfile, zlib and numpy raise many kinds
        raise HealthCheckError(
            f"samples file {spec.file} unreadable: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        outputs = engine.infer(inputs)
    except EngineError as exc:
        raise HealthCheckError(f"model failed on its own samples: {exc}") from exc
    try:
        _compare(outputs, expected, spec.rtol, spec.atol)
    except (TypeError, ValueError) as exc:  # e.g. expected values that are not numbers
        raise HealthCheckError(f"expected samples cannot be compared: {exc}") from exc


def _compare(
    outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], rtol: float, atol: float
) -> None:
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None:
            raise HealthCheckError(f"model has no output {name!r}")
        if got.shape != want.shape:
            raise HealthCheckError(f"output {name!r}: shape {got.shape}, expected {want.shape}")
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise HealthCheckError(
                f"output {name!r} differs from the expected samples by up to {worst:.3g} "
                f"(rtol {rtol}, atol {atol})"
            )


def _warm_up(engine: Engine) -> None:
    """One all-zeros batch, when the schema says the whole input shape: a model that cannot
    run a well-shaped input is refused. With a dynamic dim besides the batch, the shape
    :meth:`Engine.warmup` would guess (1) may simply be too small for the model (a 3x3
    convolution on a 1x1 image), so the run is left to the first request."""
    if any(None in spec.shape[1:] for spec in engine.inputs):
        log.info("no warm-up run: an input has a dynamic dimension besides the batch")
        return
    try:
        engine.warmup()
    except EngineError as exc:
        raise HealthCheckError(f"model failed its warm-up run: {exc}") from exc


def open_checked_engine(slot: Path, manifest: BundleManifest, **options) -> Engine:
    """Load the slot's model and run its health check; the caller owns the engine."""
    # Said before the native runtime takes over: if it crashes the process, this is the
    # last line in the log and names the model.
    log.info("loading %s v%d (%s) from %s", manifest.name, manifest.version,
             manifest.model_file, slot)
    try:
        engine = load_engine(slot / manifest.model_file, **options)
    except EngineError as exc:
        raise HealthCheckError(f"model does not load: {exc}") from exc
    engine.refuse_nan([spec.name for spec in manifest.inputs if not spec.allow_nan])
    try:
        _check(engine, manifest, slot)
    except BaseException:
        engine.close()
        raise
    return engine
