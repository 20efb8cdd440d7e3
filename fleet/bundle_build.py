"""Building a bundle: model + manifest + health-check samples + training baseline, one file.

The expected outputs are computed here, with the same engine code the device runs, so the
device's health check compares like with like. The archive is deterministic (fixed mtime,
owner and mode) so the same inputs give the same bytes and the same TUF hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.contract import (
    MANIFEST_NAME,
    MAX_HISTOGRAM_BINS,
    SAMPLE_EXPECTED_PREFIX,
    SAMPLE_INPUT_PREFIX,
    Baseline,
    BaselineHistogram,
    BundleManifest,
    FileEntry,
    HealthCheckSpec,
    MessageRejected,
    TensorSchema,
    to_json,
    utcnow,
    validated,
)
from agent.runtime import Engine, EngineError, TensorSpec, load_engine

__all__ = ["BuildError", "BuiltBundle", "build_bundle", "compute_baseline"]

RUNTIME_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
DEFAULT_BINS = 20
DEFAULT_SAMPLE_ROWS = 8


class BuildError(ValueError):
    """The operator's inputs cannot make a bundle; the message says which and why."""


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    manifest: BundleManifest
    sha256: str
    size: int


def _schema(spec: TensorSpec, allow_nan: bool = False) -> TensorSchema:
    return TensorSchema(
        name=spec.name, dtype=spec.dtype, shape=list(spec.shape), allow_nan=allow_nan
    )


def _feature_input(engine: Engine) -> TensorSpec:
    if len(engine.inputs) != 1 or len(engine.inputs[0].shape) != 2:
        raise BuildError(
            "a baseline needs a model with one 2-D input (batch, features); this model has "
            + ", ".join(f"{s.name}{s.describe_shape()}" for s in engine.inputs)
        )
    return engine.inputs[0]


def compute_baseline(rows: np.ndarray, spec: TensorSpec, bins: int = DEFAULT_BINS) -> Baseline:
    """Quantile bins per feature (equal-mass on the training data), with their counts."""
    features = spec.shape[1]
    if rows.ndim != 2 or (features is not None and rows.shape[1] != features):
        raise BuildError(
            f"baseline: expected shape (rows, {features}), given {rows.shape}"
        )
    if not np.issubdtype(rows.dtype, np.number) or not np.isfinite(rows).all():
        raise BuildError("baseline: values must be finite numbers")
    bins = min(bins, MAX_HISTOGRAM_BINS)
    histograms = []
    for index in range(rows.shape[1]):
        column = rows[:, index].astype(np.float64)
        edges = np.unique(np.quantile(column, np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:  # a constant feature still gets one bin around its value
            edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
        counts, _ = np.histogram(column, bins=edges)
        histograms.append(
            BaselineHistogram(
                feature=f"{spec.name}[{index}]",
                edges=[float(e) for e in edges],
                counts=[int(c) for c in counts],
            )
        )
    try:
        return validated(Baseline(rows=int(rows.shape[0]), features=histograms))
    except MessageRejected as exc:
        raise BuildError(f"baseline: {exc.detail}") from None


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what} {path}: not a readable .npy file ({exc})") from exc


def _sample_inputs(
    engine: Engine, samples: Path | None, baseline: np.ndarray | None
) -> dict[str, np.ndarray]:
    if samples is not None:
        data = _load_array(samples, "samples")
        if isinstance(data, np.lib.npyio.NpzFile):
            return {name: data[name] for name in data.files}
        if len(engine.inputs) != 1:
            raise BuildError("samples: a multi-input model needs an .npz keyed by input name")
        return {engine.inputs[0].name: data}
    if baseline is not None:
        return {engine.inputs[0].name: baseline[:DEFAULT_SAMPLE_ROWS]}
    generator = np.random.default_rng(0)
    generated = {}
    for spec in engine.inputs:
        shape = [DEFAULT_SAMPLE_ROWS if i == 0 and d is None else (d or 1)
                 for i, d in enumerate(spec.shape)]
        generated[spec.name] = generator.standard_normal(shape).astype(spec.dtype)
    return generated


def build_bundle(
    model: Path,
    *,
    name: str,
    version: int,
    out_dir: Path,
    baseline: Path | None = None,
    samples: Path | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    allow_nan: bool = False,
) -> BuiltBundle:
    runtime = RUNTIME_BY_SUFFIX.get(model.suffix.lower())
    if runtime is None:
        raise BuildError(f"{model}: model must be .onnx or .tflite")
    if not model.is_file():
        raise BuildError(f"{model}: no such file")
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"--out {out_dir} is a file: --out takes the directory to write to")
    model_bytes = model.read_bytes()
    if not model_bytes:
        raise BuildError(f"{model}: the file is empty")
    model_file = f"model{model.suffix.lower()}"

    try:
        loaded = load_engine(model)
    except EngineError as exc:
        raise BuildError(f"{model}: not a model this runtime can load ({exc})") from None
    with loaded as engine:
        baseline_rows = _load_array(baseline, "baseline") if baseline is not None else None
        baseline_doc = (
            compute_baseline(baseline_rows, _feature_input(engine))
            if baseline_rows is not None
            else None
        )
        inputs = _sample_inputs(engine, samples, baseline_rows)
        try:
            expected = engine.infer(inputs)
        except ValueError as exc:
            raise BuildError(f"samples do not fit the model: {exc}") from None
        except EngineError as exc:
            hint = "" if samples is not None else " (give real inputs with --samples)"
            raise BuildError(f"the model failed on its health-check samples{hint}: {exc}") \
                from None
        prepared = {spec.name: np.asarray(inputs[spec.name]).astype(spec.dtype)
                    for spec in engine.inputs}
        input_schema = [_schema(s, allow_nan) for s in engine.inputs]
        output_schema = [_schema(s) for s in engine.outputs]

    samples_buffer = io.BytesIO()
    np.savez(
        samples_buffer,
        **{SAMPLE_INPUT_PREFIX + k: v for k, v in prepared.items()},
        **{SAMPLE_EXPECTED_PREFIX + k: v for k, v in expected.items()},
    )
    members: dict[str, bytes] = {model_file: model_bytes, "samples.npz": samples_buffer.getvalue()}
    if baseline_doc is not None:
        members["baseline.json"] = to_json(baseline_doc)

    manifest = BundleManifest(
        name=name,
        version=version,
        runtime=runtime,
        model_file=model_file,
        inputs=input_schema,
        outputs=output_schema,
        files={
            member: FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
            for member, data in members.items()
        },
        health_check=HealthCheckSpec(file="samples.npz", rtol=rtol, atol=atol),
        baseline_file="baseline.json" if baseline_doc is not None else None,
        created=utcnow(),
    )
    try:
        manifest = validated(manifest)
    except MessageRejected as exc:
        raise BuildError(f"bundle manifest: {exc.detail}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / manifest.target_name
    write_archive(path, {MANIFEST_NAME: to_json(manifest, indent=2), **members})
    data = path.read_bytes()
    return BuiltBundle(path, manifest, hashlib.sha256(data).hexdigest(), len(data))


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    """Write members in order (manifest first) as a deterministic uncompressed tar."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def manifest_json(path: Path, max_bytes: int) -> dict:
    """The manifest of a built bundle (its first member), without unpacking the rest."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != MANIFEST_NAME or not member.isfile():
                raise BuildError(f"{path}: first member is not {MANIFEST_NAME}")
            if member.size > max_bytes:
                raise BuildError(f"{path}: manifest of {member.size} bytes is too large")
            handle = tar.extractfile(member)
            assert handle is not None
            return json.loads(handle.read())
    except (tarfile.TarError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path}: not a bundle: {exc}") from exc
