"""What drift tracking watches for one bundle: the baseline's summaries, checked against
the bundle's tensors, with the edges ready to bin on.

A plan is made once per installed bundle, before any request is observed, so the request
path only copies and counts. Making one never fails for a baseline it can partly use: a
summary naming a tensor the model does not have, or whose features the baseline lacks
or cannot fit, is left out and said in :attr:`DriftPlan.skipped` (the agent reports it);
the model serves the same either way. Only a ``baseline.json`` that cannot be read at all
is a :class:`BaselineError`.

Baselines written before summaries existed (no ``summaries``) describe the model's one
2-D input, column ``i`` being feature ``NAME[i]``: they are read as a ``values`` summary
of that input, and the device tracks them as before, with no output features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.contract import (
    MAX_BASELINE_BYTES,
    ActiveModel,
    Baseline,
    BundleManifest,
    MessageRejected,
    SummarySpec,
    TensorSchema,
    decode,
)
from agent.drift.summaries import SummaryError, feature_names, summarise

__all__ = [
    "BaselineError",
    "DriftPlan",
    "TrackedTensor",
    "load_baseline",
    "load_drift_plan",
    "plan_drift",
]

_CHECK_ELEMENTS = 1 << 20  # a summary is tried on one zero row of at most this many


class BaselineError(ValueError):
    """``baseline.json`` is missing, too large or not a baseline; drift is off for it."""

    reason = "bad_baseline"


@dataclass(frozen=True)
class TrackedTensor:
    """One summarised tensor: its features and, per feature, the baseline's edges."""

    spec: SummarySpec
    features: tuple[str, ...]
    edges: tuple[np.ndarray, ...]
    dtype: np.dtype
    row_shape: tuple[int, ...] | None  # the dims after the batch, None when any is dynamic

    @property
    def name(self) -> str:
        return self.spec.tensor

    @property
    def is_output(self) -> bool:
        return self.spec.role == "output"


@dataclass(frozen=True)
class DriftPlan:
    """The tensors tracked for ``model``, inputs first, in the baseline's order."""

    model: ActiveModel
    tensors: tuple[TrackedTensor, ...]
    skipped: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(name for tensor in self.tensors for name in tensor.features)


def load_baseline(path: Path) -> Baseline:
    """Read and validate ``baseline.json``, refusing it past :data:`MAX_BASELINE_BYTES`."""
    try:
        size = path.stat().st_size
        if size > MAX_BASELINE_BYTES:
            raise BaselineError(f"{path.name}: {size} bytes, over {MAX_BASELINE_BYTES}")
        return decode(Baseline, path.read_bytes())
    except OSError as exc:
        raise BaselineError(f"{path.name}: {exc.strerror or exc}") from exc
    except MessageRejected as exc:
        raise BaselineError(f"{path.name}: {exc.detail}") from exc


def load_drift_plan(slot: Path, manifest: BundleManifest) -> DriftPlan | None:
    """The plan for the bundle unpacked in ``slot``; None when it has no baseline."""
    if manifest.baseline_file is None:
        return None
    return plan_drift(manifest, load_baseline(slot / manifest.baseline_file))


def plan_drift(manifest: BundleManifest, baseline: Baseline) -> DriftPlan:
    """Match the baseline's summaries to the bundle's tensors (see the module docstring)."""
    model = ActiveModel(name=manifest.name, version=manifest.version)
    skipped: list[str] = []
    specs = list(baseline.summaries) or _legacy_spec(manifest, baseline, skipped)
    histograms = {histogram.feature: histogram for histogram in baseline.features}
    schemas = {
        "input": {schema.name: schema for schema in manifest.inputs},
        "output": {schema.name: schema for schema in manifest.outputs},
    }
    tracked: list[TrackedTensor] = []
    for spec in sorted(specs, key=lambda s: s.role != "input"):  # stable: inputs first
        where = f"{spec.role} {spec.tensor!r}"
        schema = schemas[spec.role].get(spec.tensor)
        if schema is None:
            skipped.append(f"{where}: the model has no such {spec.role}")
            continue
        names = feature_names(spec)
        if missing := [name for name in names if name not in histograms]:
            skipped.append(f"{where}: the baseline has no histogram for {missing[0]!r}")
            continue
        row_shape = _row_shape(schema)
        try:
            _try(spec, schema, row_shape)
        except SummaryError as exc:
            skipped.append(str(exc))
            continue
        tracked.append(TrackedTensor(
            spec=spec,
            features=names,
            edges=tuple(np.asarray(histograms[n].edges, dtype=np.float64) for n in names),
            dtype=np.dtype(schema.dtype),
            row_shape=row_shape,
        ))
    return DriftPlan(model=model, tensors=tuple(tracked), skipped=tuple(skipped))


def _legacy_spec(
    manifest: BundleManifest, baseline: Baseline, skipped: list[str]
) -> list[SummarySpec]:
    if not baseline.features:
        return []
    schema = manifest.inputs[0]
    expected = [f"{schema.name}[{i}]" for i in range(len(baseline.features))]
    if len(manifest.inputs) != 1 or [h.feature for h in baseline.features] != expected:
        skipped.append("baseline without summaries: its features are not the columns of "
                       "the model's one input")
        return []
    return [SummarySpec(tensor=schema.name, role="input", kind="values",
                        columns=len(expected))]


def _row_shape(schema: TensorSchema) -> tuple[int, ...] | None:
    row = schema.shape[1:]
    return None if None in row else tuple(d for d in row if d is not None)


def _try(spec: SummarySpec, schema: TensorSchema, row_shape: tuple[int, ...] | None) -> None:
    """Summarise one zero row, when the row's shape is known: a summary that cannot take
    the tensor is found now rather than counted missing on every request."""
    if row_shape is None or math.prod(row_shape) > _CHECK_ELEMENTS:
        return
    summarise(spec, np.zeros((1, *row_shape), dtype=schema.dtype))
