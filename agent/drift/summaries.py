"""Per-row summaries: what drift tracking looks at in a model's tensors.

A drift histogram needs scalar features. A tabular model's input already is a row of
scalars; an image, a second of audio or a vector of class scores is not, so each tensor is
reduced, row by row (one sample of the batch), to a few named features by a *summary*.
The summary of every tensor is chosen once, when the bundle is built, and recorded in its
``baseline.json`` (:class:`~agent.contract.SummarySpec`); the device computes the live
features with this same module. A live feature therefore means exactly what its baseline
means, whichever rule chose it and whatever this module's rules become later.

**Which tensors.** Only tensors whose axis 0 is the batch: dynamic, or fixed at 1 (a model
exported for batch 1). A scalar, or a tensor with another fixed leading dim (a recurrent
state ``[2, batch, 128]``, a sample rate), is configuration, not a sample: not summarised.

**Auto choice for an input** (the row is the shape after the batch dim):

1. ``image``: rank 4 with a channel dim of 1, 3 or 4 at axis 1 (NCHW) or axis 3 (NHWC);
   axis 1 when both qualify (ONNX's convention). A rank-3 ``uint8`` input is a one-channel
   image. Features per channel: ``mean``, ``std``, ``p10``, ``p50``, ``p90`` of the pixel
   values (percentiles over at most :data:`QUANTILE_PIXELS` pixels, evenly strided).
2. ``values``: a row of one dim, fixed at no more than :data:`AUTO_VALUE_COLUMNS` elements,
   or a row that is one scalar: every column is a feature (``x[3]``), as baselines were
   before summaries existed.
3. ``audio``: a row of one dim, longer or dynamic, of floats or int16 (PCM):
   ``rms``, ``zcr`` (zero-crossing rate), ``peak`` (largest absolute sample).
4. ``stats``: anything else: ``mean``, ``std``, ``min``, ``max`` over the row.

**Auto choice for an output:**

1. ``classes``: floats with a row of one dim fixed at 2 to :data:`AUTO_MAX_CLASSES`
   (scores or probabilities): ``class`` (the argmax, binned exactly, one bin per class)
   and ``max`` (the top score: confidence drifts before accuracy does).
2. ``values``: a row of at most :data:`AUTO_OUTPUT_VALUES` fixed elements (a regression,
   a probability ``[N, 1]``, a label ``[N]``): each element is a feature.
3. ``scores``: anything else (a detection map, an embedding, many logits): ``max`` and
   ``mean`` over the row.

Feature names: an input's are ``NAME:stat`` (``image:ch0.mean``, ``audio:rms``), or
``NAME[i]`` for ``values``; an output's are ``output:NAME.stat`` (``output:scores.max``,
``output:label.class``), or ``output:NAME[i]``.

:func:`summarise` is vectorised over the batch and returns features first
(``(features, rows)``), because binning walks one feature at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

from agent.contract import MAX_BASELINE_BINS, MAX_FEATURES, SummaryKind, SummarySpec

__all__ = [
    "AUTO_MAX_CLASSES",
    "AUTO_OUTPUT_VALUES",
    "AUTO_VALUE_COLUMNS",
    "KINDS",
    "QUANTILE_PIXELS",
    "Role",
    "SummaryError",
    "TensorLike",
    "feature_names",
    "fixed_edges",
    "has_batch_axis",
    "summarise",
    "summary_for",
]

Role = Literal["input", "output"]
KINDS: tuple[SummaryKind, ...] = ("values", "image", "audio", "stats", "classes", "scores")
AUTO_VALUE_COLUMNS = 256  # one drift message's worth of features (MAX_DRIFT_FEATURES)
AUTO_MAX_CLASSES = 256
AUTO_OUTPUT_VALUES = 8
QUANTILE_PIXELS = 4096  # per channel and row: percentiles cost a partition of these
IMAGE_CHANNELS = (1, 3, 4)
MAX_IMAGE_CHANNELS = 64

_STATS: dict[str, tuple[str, ...]] = {
    "image": ("mean", "std", "p10", "p50", "p90"),
    "audio": ("rms", "zcr", "peak"),
    "stats": ("mean", "std", "min", "max"),
    "classes": ("class", "max"),
    "scores": ("max", "mean"),
}
_PERCENTILES = (0.1, 0.5, 0.9)


class SummaryError(ValueError):
    """A summary that does not fit the tensor (at build), or data that does not fit its
    summary (on the device: those rows count as missing)."""


class TensorLike(Protocol):
    """A tensor's description: :class:`~agent.runtime.TensorSpec` or a manifest's
    :class:`~agent.contract.TensorSchema`."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | None]: ...


def has_batch_axis(shape: Sequence[int | None]) -> bool:
    """Axis 0 is the batch: dynamic, or fixed at 1."""
    return len(shape) > 0 and shape[0] in (None, 1)


def _row_size(shape: Sequence[int | None]) -> int | None:
    row = shape[1:]
    return None if None in row else math.prod(d for d in row if d is not None)


def _channel_axis(shape: Sequence[int | None]) -> int | None:
    """Axis 1 or 3 of a rank-4 shape holding 1, 3 or 4 channels (axis 1 first), else None."""
    if len(shape) != 4:
        return None
    return next((axis for axis in (1, 3) if shape[axis] in IMAGE_CHANNELS), None)


def summary_for(
    tensor: TensorLike,
    role: Role,
    kind: SummaryKind | Literal["none"] | None = None,
    layout: Literal["nchw", "nhwc", "gray"] | None = None,
) -> SummarySpec | None:
    """The summary of ``tensor``: the auto rule (module docstring) when ``kind`` is None,
    else ``kind`` checked against the tensor. ``layout`` places an image's channels (by
    default detected). None: the tensor is not summarised. Raises :class:`SummaryError`
    for a choice the tensor cannot take, naming the tensor."""
    shape = list(tensor.shape)
    if kind == "none":
        return None
    if not has_batch_axis(shape):
        if kind is None:
            return None
        what = "a scalar" if not shape else f"leading dim fixed at {shape[0]}"
        raise SummaryError(f"{role} {tensor.name!r} has no batch axis ({what}): it cannot "
                           f"have a {kind!r} summary")
    dtype = np.dtype(tensor.dtype)
    size = _row_size(shape)
    if layout is not None and kind not in (None, "image"):
        raise SummaryError(f"{role} {tensor.name!r}: a layout ({layout}) is for images")
    if kind is None:
        kind = _auto(shape, dtype, role, size, layout)
    spec = _spec(tensor.name, role, kind, shape, dtype, size, layout)
    names = feature_names(spec)
    if len(names) > MAX_FEATURES:
        raise SummaryError(f"{role} {tensor.name!r}: {len(names)} features, over "
                           f"{MAX_FEATURES}")
    return spec


def _auto(
    shape: list[int | None], dtype: np.dtype, role: Role, size: int | None, layout: str | None
) -> SummaryKind:
    rank = len(shape)
    if role == "output":
        if dtype.kind == "f" and rank == 2 and size is not None and (
            2 <= size <= AUTO_MAX_CLASSES
        ):
            return "classes"
        if size is not None and size <= AUTO_OUTPUT_VALUES:
            return "values"
        return "scores"
    if layout is not None or _channel_axis(shape) is not None or (
        rank == 3 and dtype == np.uint8
    ):
        return "image"
    if rank == 1 or (rank == 2 and size is not None and size <= AUTO_VALUE_COLUMNS):
        return "values"
    if rank == 2 and (dtype.kind == "f" or dtype == np.int16):
        return "audio"
    return "stats"


def _spec(
    name: str,
    role: Role,
    kind: SummaryKind,
    shape: list[int | None],
    dtype: np.dtype,
    size: int | None,
    layout: str | None,
) -> SummarySpec:
    where = f"{role} {name!r} of shape {_describe(shape)}"
    if kind not in KINDS:
        raise SummaryError(f"{where}: unknown summary {kind!r} (one of {', '.join(KINDS)}, "
                           "none)")
    if kind == "values":
        if size is None or size == 0:
            raise SummaryError(f"{where}: 'values' needs a fixed, non-empty row")
        return SummarySpec(tensor=name, role=role, kind=kind, columns=size)
    if kind == "classes":
        if size is None or not 2 <= size <= MAX_BASELINE_BINS:
            raise SummaryError(f"{where}: 'classes' needs a fixed row of 2 to "
                               f"{MAX_BASELINE_BINS} scores")
        return SummarySpec(tensor=name, role=role, kind=kind, classes=size)
    if kind == "image":
        if layout == "gray":
            return SummarySpec(tensor=name, role=role, kind=kind, channels=1)
        if len(shape) < 3:
            raise SummaryError(f"{where}: an image needs a row of at least 2 dims")
        axis = (1 if layout == "nchw" else len(shape) - 1 if layout == "nhwc"
                else _channel_axis(shape))
        if axis is None:
            if len(shape) == 3:  # [N, H, W]: one channel
                return SummarySpec(tensor=name, role=role, kind=kind, channels=1)
            raise SummaryError(f"{where}: no channel dim of 1, 3 or 4 at axis 1 or 3; "
                               "give the layout (nchw, nhwc or gray)")
        channels = shape[axis]
        if channels is None or not 1 <= channels <= MAX_IMAGE_CHANNELS:
            raise SummaryError(f"{where}: the channel dim (axis {axis}) must be fixed, "
                               f"1 to {MAX_IMAGE_CHANNELS}")
        return SummarySpec(tensor=name, role=role, kind=kind, channels=channels,
                           channel_axis=axis)
    return SummarySpec(tensor=name, role=role, kind=kind)


def _describe(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def feature_names(spec: SummarySpec) -> tuple[str, ...]:
    """The features ``spec`` yields, in :func:`summarise`'s order."""
    if spec.role == "input":
        base, sep = spec.tensor, ":"
    else:
        base, sep = f"output:{spec.tensor}", "."
    if spec.kind == "values":
        return tuple(f"{base}[{i}]" for i in range(spec.columns or 0))
    stats = _STATS[spec.kind]
    if spec.kind == "image":
        return tuple(f"{base}{sep}ch{c}.{stat}" for c in range(spec.channels or 1)
                     for stat in stats)
    return tuple(f"{base}{sep}{stat}" for stat in stats)


def fixed_edges(spec: SummarySpec) -> dict[str, list[float]]:
    """Edges the summary itself fixes: one bin per class id for ``classes``. The other
    features get equal-mass bins from the training data."""
    if spec.kind != "classes" or spec.classes is None:
        return {}
    return {feature_names(spec)[0]: [c - 0.5 for c in range(spec.classes + 1)]}


def summarise(spec: SummarySpec, batch: np.ndarray) -> np.ndarray:
    """The features of every row of ``batch`` (axis 0): float64, shape (features, rows),
    C-contiguous and never a view of ``batch`` (callers sort it in place). NaN where a
    row has no value (an empty row, NaN in the data)."""
    if batch.ndim == 0:
        raise SummaryError(f"{spec.role} {spec.tensor!r}: a scalar has no rows")
    rows = batch.shape[0]
    if spec.kind == "image":
        return _image(spec, batch)
    flat = batch.reshape(rows, -1)
    if spec.kind == "values":
        if flat.shape[1] != spec.columns:
            raise SummaryError(f"{spec.role} {spec.tensor!r}: rows of {flat.shape[1]} "
                               f"values, the baseline has {spec.columns}")
        return np.array(flat.T, dtype=np.float64, order="C")
    if flat.shape[1] == 0:
        return np.full((len(_STATS[spec.kind]), rows), np.nan)
    if spec.kind == "audio":
        return _audio(flat)
    if spec.kind == "classes":
        if flat.shape[1] != spec.classes:
            raise SummaryError(f"{spec.role} {spec.tensor!r}: rows of {flat.shape[1]} "
                               f"scores, the baseline has {spec.classes} classes")
        top = flat.max(axis=1).astype(np.float64)
        label = flat.argmax(axis=1).astype(np.float64)
        label[np.isnan(top)] = np.nan  # argmax names the first NaN: no class
        return np.stack([label, top])
    if spec.kind == "scores":
        return np.stack([flat.max(axis=1).astype(np.float64),
                         flat.mean(axis=1, dtype=np.float64)])
    return np.stack([flat.mean(axis=1, dtype=np.float64), flat.std(axis=1, dtype=np.float64),
                     flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)])


def _audio(flat: np.ndarray) -> np.ndarray:
    samples = flat if flat.dtype.kind == "f" else flat.astype(np.float32)
    count = samples.shape[1]
    rms = np.sqrt(np.einsum("ij,ij->i", samples, samples, dtype=np.float64) / count)
    sign = np.signbit(samples)
    crossings = np.count_nonzero(sign[:, 1:] != sign[:, :-1], axis=1) / max(count - 1, 1)
    peak = np.maximum(samples.max(axis=1), -samples.min(axis=1)).astype(np.float64)
    return np.stack([rms, crossings.astype(np.float64), peak])


def _image(spec: SummarySpec, batch: np.ndarray) -> np.ndarray:
    rows = batch.shape[0]
    channels = spec.channels or 1
    axis = spec.channel_axis
    if axis is None:  # one channel: every value of the row is a pixel
        pixels, pixel_axis = batch.reshape(rows, 1, -1), 2
    else:
        if batch.ndim <= axis or batch.shape[axis] != channels:
            raise SummaryError(f"{spec.role} {spec.tensor!r}: shape {batch.shape} has no "
                               f"{channels} channels at axis {axis}")
        if axis == batch.ndim - 1:  # NHWC: reduce over the middle, no transpose copy
            pixels, pixel_axis = batch.reshape(rows, -1, channels), 1
        else:
            pixels, pixel_axis = np.moveaxis(batch, axis, 1).reshape(rows, channels, -1), 2
    count = pixels.shape[pixel_axis]
    if count == 0:
        return np.full((channels * len(_STATS["image"]), rows), np.nan)
    mean = pixels.mean(axis=pixel_axis, dtype=np.float64)
    std = pixels.std(axis=pixel_axis, dtype=np.float64)
    stride = -(-count // QUANTILE_PIXELS)
    sample = pixels[:, :, ::stride] if pixel_axis == 2 else pixels[:, ::stride, :]
    kept = sample.shape[pixel_axis]
    kth = [int(q * (kept - 1)) for q in _PERCENTILES]  # the lower value: no interpolation
    ranked = np.partition(sample, kth, axis=pixel_axis)
    quantiles = np.take(ranked, kth, axis=pixel_axis).astype(np.float64)
    if pixel_axis == 1:
        quantiles = quantiles.transpose(0, 2, 1)  # (rows, channels, 3)
    stacked = np.concatenate([mean[..., None], std[..., None], quantiles], axis=2)
    return np.ascontiguousarray(stacked.reshape(rows, -1).T)
