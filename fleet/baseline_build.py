"""A bundle's drift baseline: what the model's inputs and outputs looked like on training
data, as the histograms the device's live windows are compared with.

The operator gives training inputs with ``--baseline``: an ``.npy`` for a one-input model,
or an ``.npz`` with one array per input name; rows on axis 0, every input with a batch
axis having the same rows. An input without one (a sample rate, a recurrent state) is
passed to the model as given with every batch. (A folder of images would need an image
decoder; Pillow is not a dependency, so images come as an array: ``np.save`` them.)

The model runs on the rows with the engine the device runs, in batches, so the output
baseline is what this model answers. Every input and output is reduced per row by the
summary :mod:`agent.drift.summaries` chooses (its rules; ``summaries`` overrides them per
tensor), and the choice goes into ``baseline.json``, so the device computes the same
features. Bins are equal-mass (quantiles of the training values, ``bins`` of them, fewer
where values repeat), except where a feature's values are known to be discrete: one bin
per class for a ``classes`` summary's class id, one bin per integer for a feature whose
training values are integers of at most ``bins`` distinct values (a label, a flag).

The work is bounded whatever the file holds: at most ``max_rows`` rows and ``max_bytes``
of input data are run (evenly spaced rows when the file has more; a warning says so), at
most :data:`MAX_SUMMARY_VALUES` feature values are kept, ``.npy`` files are memory-mapped
(only the rows used are read) and an ``.npz`` may not inflate past ``max_file_bytes``.
Every refusal is a one-line :class:`~fleet.build_errors.BuildError` naming the input.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from agent.contract import (
    MAX_BASELINE_BINS,
    MAX_FEATURES,
    Baseline,
    BaselineHistogram,
    MessageRejected,
    SummarySpec,
    validated,
)
from agent.drift.summaries import (
    KINDS,
    SummaryError,
    feature_names,
    fixed_edges,
    has_batch_axis,
    summarise,
    summary_for,
)
from agent.runtime import Engine, EngineError, TensorSpec
from fleet.build_errors import BuildError, one_line

__all__ = [
    "DEFAULT_BASELINE_BYTES",
    "DEFAULT_BASELINE_FILE_BYTES",
    "DEFAULT_BASELINE_ROWS",
    "DEFAULT_BINS",
    "BaselineResult",
    "SummaryChoice",
    "compute_baseline",
    "first_rows",
    "load_baseline_data",
    "parse_summary_hints",
]

DEFAULT_BINS = 20
DEFAULT_BASELINE_ROWS = 20_000
DEFAULT_BASELINE_BYTES = 256 * 1024 * 1024  # input data run through the model
DEFAULT_BASELINE_FILE_BYTES = 1024 * 1024 * 1024  # what an .npz may inflate to
MAX_SUMMARY_VALUES = 32 * 1024 * 1024  # features x rows kept for the quantiles (256 MiB)
BATCH_BYTES = 8 * 1024 * 1024
MAX_BATCH_ROWS = 256
LAYOUTS = ("nchw", "nhwc", "gray")

Layout = Literal["nchw", "nhwc", "gray"]


@dataclass(frozen=True)
class SummaryChoice:
    """An operator's choice for one tensor: a summary kind (or ``none``) and, for an
    image, where its channels are."""

    kind: str
    layout: Layout | None = None


@dataclass(frozen=True)
class BaselineResult:
    baseline: Baseline
    warnings: tuple[str, ...] = ()


def parse_summary_hints(hints: Sequence[str]) -> dict[str, SummaryChoice]:
    """``NAME=KIND`` or ``NAME=image:LAYOUT`` as given on the command line (``--summary``):
    KIND one of values, image, audio, stats, classes, scores, none; LAYOUT nchw, nhwc or
    gray."""
    parsed: dict[str, SummaryChoice] = {}
    for hint in hints:
        name, sep, text = hint.partition("=")
        kind, _, layout = text.partition(":")
        if (not sep or not name or kind not in (*KINDS, "none")
                or (layout and (kind != "image" or layout not in LAYOUTS))):
            raise BuildError(
                f"--summary {hint!r}: expected NAME=KIND with KIND one of "
                f"{', '.join(KINDS)}, none (an image may add :nchw, :nhwc or :gray)"
            )
        parsed[name] = SummaryChoice(kind, cast(Layout, layout) if layout else None)
    return parsed


def _choice(name: str, value: SummaryChoice | str) -> SummaryChoice:
    """A choice given in code as text (``"image:nhwc"``) is read like ``--summary``."""
    return value if isinstance(value, SummaryChoice) else parse_summary_hints(
        [f"{name}={value}"])[name]


MAX_FOLDER_FILES = 100_000


def _one_input(path: Path, names: list[str]) -> str:
    if len(names) != 1:
        raise BuildError(f"baseline {path}: a folder is read as the rows of a one-input "
                         f"model; this one has {len(names)} inputs: give an .npz keyed by "
                         f"input name ({', '.join(names)})")
    return names[0]


def _load_folder(path: Path, spec: Any, max_bytes: int) -> np.ndarray:
    """A folder of ``.npy`` files (e.g. one per image, or a batch per file), read in name
    order and stacked: a file holding one sample (the input's rank less its batch dim) is
    one row. Other files are refused (decoding images is left to the operator's tools:
    edgefleet ships no image decoder)."""
    files = sorted(child for child in path.iterdir() if not child.name.startswith("."))
    if not files:
        raise BuildError(f"baseline {path}: an empty folder")
    if len(files) > MAX_FOLDER_FILES:
        raise BuildError(f"baseline {path}: {len(files)} files, over {MAX_FOLDER_FILES}")
    others = [child.name for child in files if child.suffix.lower() != ".npy"
              or not child.is_file()]
    if others:
        raise BuildError(f"baseline {path}: only .npy files are read from a folder, not "
                         f"{others[0]} (decode images into arrays and np.save them)")
    total = sum(child.stat().st_size for child in files)
    if total > max_bytes:
        raise BuildError(f"baseline {path}: {total / 2**20:.0f} MiB of files, over "
                         f"{max_bytes / 2**20:.0f} MiB: give fewer rows")
    rank = len(spec.shape)
    rows = []
    for child in files:
        try:
            array = np.load(child, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BuildError(f"baseline {child}: not a readable .npy file "
                             f"({one_line(exc)})") from None
        if array.ndim == rank - 1:
            array = array[np.newaxis]
        if array.ndim != rank or (rows and array.shape[1:] != rows[0].shape[1:]):
            raise BuildError(f"baseline {child}: shape {array.shape} does not stack with "
                             f"the others as rows of input {spec.name!r} {spec.shape}")
        rows.append(array)
    return np.concatenate(rows)


def load_baseline_data(
    path: Path, engine: Engine, max_file_bytes: int = DEFAULT_BASELINE_FILE_BYTES
) -> dict[str, np.ndarray]:
    """The training inputs by input name: ``.npy`` (memory-mapped) for a one-input model,
    ``.npz`` keyed by input name (each member's inflated size checked before reading), or
    a folder of ``.npy`` files stacked as the rows of a one-input model."""
    names = [spec.name for spec in engine.inputs]
    if path.is_dir():
        return {_one_input(path, names): _load_folder(path, engine.inputs[0], max_file_bytes)}
    if not path.is_file():
        raise BuildError(f"baseline {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(names) != 1:
            raise BuildError(f"baseline {path}: a model with {len(names)} inputs needs an "
                             f".npz keyed by input name ({', '.join(names)})")
        try:
            return {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        except (OSError, ValueError) as exc:
            raise BuildError(f"baseline {path}: not a readable .npy file "
                             f"({one_line(exc)})") from None
    if suffix != ".npz":
        raise BuildError(f"baseline {path}: expected an .npy or .npz file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            inflated = sum(info.file_size for info in members.values())
            if inflated > max_file_bytes:
                raise BuildError(
                    f"baseline {path}: inflates to {inflated / 2**20:.0f} MiB, over "
                    f"{max_file_bytes / 2**20:.0f} MiB: give fewer rows, or an .npy (read "
                    "memory-mapped) for a one-input model"
                )
        if unknown := sorted(set(members) - set(names)):
            raise BuildError(f"baseline {path}: no model input named {', '.join(unknown)} "
                             f"(its inputs: {', '.join(names)})")
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in members}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, BuildError):
            raise
        raise BuildError(f"baseline {path}: not a readable .npz file ({one_line(exc)})") \
            from None


def _batched(engine: Engine) -> list[TensorSpec]:
    return [spec for spec in engine.inputs if has_batch_axis(spec.shape)]


def _check_data(engine: Engine, data: Mapping[str, np.ndarray]) -> int:
    """The rows of the baseline, after checking every input is there with its shape."""
    batched = _batched(engine)
    if not batched:
        raise BuildError("baseline: no model input has a batch axis (leading dim dynamic or "
                         "1), so there are no rows to summarise")
    if missing := [spec.name for spec in engine.inputs if spec.name not in data]:
        raise BuildError(f"baseline: no data for input {', '.join(map(repr, missing))}")
    rows = None
    for spec in batched:
        array = data[spec.name]
        label = f"input {spec.name!r} " if len(engine.inputs) > 1 else ""
        want = "(" + ", ".join(["rows", *("?" if d is None else str(d)
                                          for d in spec.shape[1:])]) + ")"
        if want.endswith(", )"):  # a rank-1 input: (rows,)
            want = "(rows,)"
        fits = array.ndim == len(spec.shape) and all(
            d is None or d == got for d, got in zip(spec.shape[1:], array.shape[1:],
                                                    strict=True))
        if not fits:
            raise BuildError(f"baseline: {label}expected shape {want}, given {array.shape}")
        if array.dtype.kind not in "biuf":
            raise BuildError(f"baseline: {label}values must be finite numbers, given "
                             f"{array.dtype}")
        if rows is not None and array.shape[0] != rows:
            raise BuildError(f"baseline: inputs disagree on rows ({rows} and "
                             f"{array.shape[0]} for {spec.name!r})")
        rows = array.shape[0]
    if not rows:
        raise BuildError("baseline: no rows")
    return rows


def first_rows(engine: Engine, data: Mapping[str, np.ndarray], count: int
               ) -> dict[str, np.ndarray]:
    """The baseline's first rows as one feed (the health-check samples made from it):
    ``count`` rows of each batched input (1 for a model exported with batch 1), the
    others as given."""
    feed = {}
    for spec in engine.inputs:
        array = data[spec.name]
        if has_batch_axis(spec.shape):
            feed[spec.name] = np.array(array[: 1 if spec.shape[0] == 1 else count])
        else:
            feed[spec.name] = np.asarray(array)
    return feed


def _refined(spec: TensorSpec, shape: tuple[int, ...]) -> TensorSpec:
    """The spec with its dynamic dims (not the batch) as the data has them: the summary
    rules read channels and widths the model leaves open (an output of unknown shape)."""
    if not spec.shape and shape:  # rank unknown to the runtime
        return replace(spec, shape=(None, *shape[1:]))
    if len(spec.shape) != len(shape):
        return spec
    dims = [spec.shape[0], *(d if d is not None else got
                             for d, got in zip(spec.shape[1:], shape[1:], strict=True))]
    return replace(spec, shape=tuple(dims))


def compute_baseline(
    engine: Engine,
    data: Mapping[str, np.ndarray],
    *,
    bins: int = DEFAULT_BINS,
    summaries: Mapping[str, SummaryChoice | str] | None = None,
    max_rows: int = DEFAULT_BASELINE_ROWS,
    max_bytes: int = DEFAULT_BASELINE_BYTES,
) -> BaselineResult:
    """Run the model on the training inputs and histogram every summary feature of its
    inputs and outputs (see the module docstring); refusals are :class:`BuildError`."""
    bins = max(1, min(bins, MAX_BASELINE_BINS))
    choices = {name: _choice(name, value) for name, value in (summaries or {}).items()}
    tensors = {spec.name for spec in (*engine.inputs, *engine.outputs)}
    if unknown := sorted(set(choices) - tensors):
        raise BuildError(f"--summary: the model has no tensor {', '.join(unknown)} (its "
                         f"inputs and outputs: {', '.join(sorted(tensors))})")
    total = _check_data(engine, data)
    warnings: list[str] = []
    batched = _batched(engine)
    row_bytes = sum(max(1, spec.numpy_dtype.itemsize * math.prod(data[spec.name].shape[1:]))
                    for spec in batched)
    batch = 1 if any(spec.shape[0] == 1 for spec in batched) else max(
        1, min(MAX_BATCH_ROWS, BATCH_BYTES // row_bytes))

    # One row first: the tensors' shapes as the model really has them choose the summaries.
    probe_in, probe_out, batch = _run(engine, data, np.arange(1), batch)
    specs = _choose(engine, probe_in, probe_out, choices)
    if not specs:
        raise BuildError("baseline: the model has no input or output with a batch axis to "
                         "summarise")
    names = [name for spec in specs for name in feature_names(spec)]
    if len(names) > MAX_FEATURES:
        raise BuildError(f"baseline: {len(names)} features, over {MAX_FEATURES}: choose "
                         "smaller summaries (e.g. stats) for the widest tensors")
    used = min(total, max_rows, max(1, max_bytes // row_bytes),
               max(1, MAX_SUMMARY_VALUES // len(names)))
    if used < total:
        warnings.append(f"baseline: {total} rows given, {used} used (evenly spaced; at most "
                        f"{max_rows} rows and {max_bytes / 2**20:.0f} MiB of inputs are run)")
    rows = np.unique(np.linspace(0, total - 1, used).round().astype(np.int64))

    columns: list[list[np.ndarray]] = [[] for _ in specs]
    start = 0
    while start < len(rows):
        chosen = rows[start : start + batch]
        feed, outputs, next_batch = _run(engine, data, chosen, batch)
        if next_batch != batch:  # the model refused a full batch: one row at a time
            batch = next_batch
            continue
        for index, spec in enumerate(specs):
            source = feed if spec.role == "input" else outputs
            try:
                columns[index].append(summarise(spec, source[spec.tensor]))
            except SummaryError as exc:
                raise BuildError(f"baseline: {exc}") from None
        start += len(chosen)

    histograms = []
    for spec, parts in zip(specs, columns, strict=True):
        values = np.concatenate(parts, axis=1)
        fixed = fixed_edges(spec)
        for name, column in zip(feature_names(spec), values, strict=True):
            histograms.append(_histogram(name, column, fixed.get(name), bins, warnings))
    try:
        baseline = validated(Baseline(rows=len(rows), features=histograms, summaries=specs))
    except MessageRejected as exc:
        raise BuildError(f"baseline: {exc.detail}") from None
    return BaselineResult(baseline, tuple(warnings))


def _run(
    engine: Engine, data: Mapping[str, np.ndarray], rows: np.ndarray, batch: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Run ``rows`` of the baseline: (the feed as the model took it, its outputs, the batch
    size to go on with). A model that fails on a batch of several rows is tried on one row
    (a recurrent state given for batch 1, a graph that only runs batch 1): when that works
    the batch size becomes 1, else the failure is the build's."""
    feed: dict[str, Any] = {}
    for spec in engine.inputs:
        array = data[spec.name]
        if has_batch_axis(spec.shape):
            part = np.asarray(array[rows])
            if part.dtype.kind == "f" and not np.isfinite(part).all():
                raise BuildError(f"baseline: input {spec.name!r}: values must be finite "
                                 "numbers (NaN or infinity in the rows used)")
            feed[spec.name] = part
        else:
            feed[spec.name] = np.asarray(array)
    try:
        outputs = engine.infer(feed)
        # What the device sees: the rows in the model's dtypes (the engine has just
        # accepted these casts, so they are safe ones).
        seen = {spec.name: np.asarray(feed[spec.name], dtype=spec.numpy_dtype)
                for spec in engine.inputs if has_batch_axis(spec.shape)}
        return seen, outputs, batch
    except EngineError as exc:
        if len(rows) > 1:
            _run(engine, data, rows[:1], 1)  # raises if one row fails too
            return {}, {}, 1
        what = "do not fit the model" if isinstance(exc, ValueError) else "made the model fail"
        raise BuildError(f"baseline: the rows {what}: {one_line(exc)}") from None


def _choose(
    engine: Engine,
    feed: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    choices: Mapping[str, SummaryChoice],
) -> list[SummarySpec]:
    specs = []
    for role, tensors, arrays in (("input", engine.inputs, feed),
                                  ("output", engine.outputs, outputs)):
        for tensor in tensors:
            choice = choices.get(tensor.name)
            try:
                seen = arrays.get(tensor.name)  # None: an input without a batch axis
                spec = summary_for(
                    tensor if seen is None else _refined(tensor, np.shape(seen)),
                    cast(Literal["input", "output"], role),
                    cast(Any, choice.kind) if choice else None,
                    choice.layout if choice else None,
                )
            except SummaryError as exc:
                raise BuildError(f"baseline: {exc}") from None
            if spec is not None:
                specs.append(spec)
    return specs


def _histogram(
    name: str, column: np.ndarray, fixed: list[float] | None, bins: int, warnings: list[str]
) -> BaselineHistogram:
    finite = column[np.isfinite(column)]
    if finite.size == 0:
        raise BuildError(f"baseline: feature {name!r} has no finite value on the baseline "
                         "rows")
    if finite.size < column.size:
        warnings.append(f"baseline: feature {name!r} is NaN or infinite on "
                        f"{column.size - finite.size} of {column.size} rows (left out; on "
                        "the device such rows count as missing)")
    low, high = float(finite.min()), float(finite.max())
    if fixed is not None:
        edges = np.asarray(fixed, dtype=np.float64)
    elif high - low < bins and np.array_equal(finite, np.round(finite)):
        edges = np.arange(low - 0.5, high + 1.0)  # one bin per integer value
    else:
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:  # a constant feature still gets one bin around its value
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    counts, _ = np.histogram(finite, bins=edges)
    return BaselineHistogram(feature=name, edges=[float(e) for e in edges],
                             counts=[int(c) for c in counts])
