"""Building a bundle: model + manifest + health-check samples + training baseline, one file.

The expected outputs are computed here, with the same engine code the device runs, so the
device's health check compares like with like. The archive is deterministic (fixed mtime,
owner and mode) so the same inputs give the same bytes and the same TUF hash.

A health check means something only if its samples are inputs the model really takes.
They come, in this order, from ``--samples``, from the baseline's first rows (each input's
first rows; ``fleet.baseline_build`` makes the baseline itself), or are made from the
model's schema plus the operator's hints: a shape per
input (``--input-shape x=1,3,640,640``) and a value per input (``--input-value sr=16000``).
What the schema leaves open and no hint fills is guessed (a dynamic dim other than a
batch is 1, an integer input is 0) and said as a warning naming the input and the dim;
if the model then fails on the guess, the build is refused in one line naming the
guessed inputs and the option that would fix them, never with a runtime traceback.

Samples are stored deflated (``np.savez_compressed``'s format, written here with fixed
timestamps so the bytes are deterministic) and capped: the compressed file by
``max_samples_bytes`` (the bundle's size), the inflated members by the device's
:data:`~agent.contract.MAX_SAMPLES_BYTES` (what an agent will inflate).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from agent.contract import (
    MANIFEST_NAME,
    MAX_BASELINE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_METADATA_KEYS,
    MAX_SAMPLES_BYTES,
    SAMPLE_EXPECTED_PREFIX,
    SAMPLE_INPUT_PREFIX,
    BundleManifest,
    DriftThresholdSpec,
    FileEntry,
    HealthCheckSpec,
    MessageRejected,
    ModelMetadata,
    TensorSchema,
    convert,
    manifest_bytes,
    to_json,
    utcnow,
    validated,
)
from agent.runtime import Engine, EngineError, TensorSpec, load_engine
from fleet.baseline_build import (
    DEFAULT_BINS,
    SummaryChoice,
    compute_baseline,
    first_rows,
    load_baseline_data,
    parse_summary_hints,
)
from fleet.build_errors import BuildError, one_line

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_MAX_SAMPLES_BYTES",
    "BuildError",
    "BuiltBundle",
    "build_bundle",
    "compute_baseline",
    "parse_hints",
    "parse_summary_hints",
]

RUNTIME_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
DEFAULT_SAMPLE_ROWS = 8
DEFAULT_MAX_SAMPLES_BYTES = 8 * 1024 * 1024
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can say: fixed bytes


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    manifest: BundleManifest
    sha256: str
    size: int
    warnings: tuple[str, ...] = field(default=())  # guesses the operator should know of


def _schema(spec: TensorSpec, allow_nan: bool = False) -> TensorSchema:
    return TensorSchema(
        name=spec.name, dtype=spec.dtype, shape=list(spec.shape), allow_nan=allow_nan
    )


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what} {path}: not a readable .npy file ({exc})") from exc


def parse_hints(
    shapes: Sequence[str] = (), values: Sequence[str] = ()
) -> tuple[dict[str, tuple[int, ...]], dict[str, float | int]]:
    """``--input-shape NAME=D1,D2,...`` and ``--input-value NAME=V`` as given on the command
    line, read into :func:`build_bundle`'s ``input_shapes`` and ``input_values``."""
    parsed_shapes: dict[str, tuple[int, ...]] = {}
    for hint in shapes:
        name, sep, dims = hint.partition("=")
        try:
            shape = tuple(int(dim) for dim in dims.split(",")) if dims.strip() else ()
        except ValueError:
            shape = (-1,)
        if not sep or not name or any(dim < 0 for dim in shape):
            raise BuildError(
                f"--input-shape {hint!r}: expected NAME=D1,D2,... with non-negative integer "
                "dims (e.g. x=1,3,640,640; NAME= for a scalar)"
            )
        parsed_shapes[name] = shape
    parsed_values: dict[str, float | int] = {}
    for hint in values:
        name, sep, text = hint.partition("=")
        try:
            number: float | int = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = float("nan")
        if not sep or not name or number != number:
            raise BuildError(f"--input-value {hint!r}: expected NAME=NUMBER (e.g. sr=16000)")
        parsed_values[name] = number
    return parsed_shapes, parsed_values


@dataclass
class _Samples:
    inputs: dict[str, np.ndarray]
    guessed: list[str]  # what was guessed, for the warning and for a refusal
    options: list[str]  # the hint that would replace each guess


def _sample_inputs(
    engine: Engine,
    samples: Path | None,
    baseline: Mapping[str, np.ndarray] | None,
    shapes: Mapping[str, Sequence[int]],
    values: Mapping[str, float | int],
) -> _Samples:
    if samples is not None:
        if shapes or values:
            raise BuildError(
                "--samples gives the health-check inputs: --input-shape and --input-value "
                "are for building them from the schema; give one or the other"
            )
        data = _load_array(samples, "samples")
        if isinstance(data, np.lib.npyio.NpzFile):
            return _Samples({name: data[name] for name in data.files}, [], [])
        if len(engine.inputs) != 1:
            raise BuildError("samples: a multi-input model needs an .npz keyed by input name")
        return _Samples({engine.inputs[0].name: data}, [], [])
    known = [spec.name for spec in engine.inputs]
    for option, hinted in (("--input-shape", shapes), ("--input-value", values)):
        if unknown := sorted(set(hinted) - set(known)):
            raise BuildError(f"{option}: the model has no input {', '.join(unknown)} "
                             f"(its inputs: {', '.join(known)})")
    if baseline is not None and not shapes and not values:
        return _Samples(first_rows(engine, baseline, DEFAULT_SAMPLE_ROWS), [], [])
    generator = np.random.default_rng(0)
    made = _Samples({}, [], [])
    # ONNX dims named alike are one size: a hinted input's sizes fill the others' (the
    # batch of a recurrent state from the audio's), and guesses agree with each other.
    named: dict[str, int] = {}
    for spec in engine.inputs:
        hint = shapes.get(spec.name)
        if hint is not None and len(hint) == len(spec.dim_names):
            named.update((dim_name, size) for dim_name, size in zip(spec.dim_names, hint,
                                                                      strict=True) if dim_name)
    for spec in engine.inputs:
        shape = _sample_shape(spec, shapes.get(spec.name), len(engine.inputs), made, named)
        dtype = spec.numpy_dtype
        if spec.name in values:
            value = values[spec.name]
            if dtype.kind in "iub" and not float(value).is_integer():
                raise BuildError(f"--input-value {spec.name}={value}: input {spec.name!r} is "
                                 f"{spec.dtype}, give an integer")
            made.inputs[spec.name] = np.full(shape, value, dtype)
        elif dtype.kind == "f":  # noise on a 1/256 grid: ~11 bits a value, so it deflates
            noise = np.round(generator.standard_normal(shape) * 256) / 256
            made.inputs[spec.name] = noise.astype(dtype)
        else:  # an index, a flag, a rate: any number drawn is as likely wrong as 0
            made.inputs[spec.name] = np.zeros(shape, dtype)
            made.guessed.append(f"the values of {spec.name!r} ({spec.dtype}: 0)")
            made.options.append(f"--input-value {spec.name}=V")
    return made


def _sample_shape(
    spec: TensorSpec,
    hint: Sequence[int] | None,
    input_count: int,
    made: _Samples,
    named: dict[str, int],
) -> tuple[int, ...]:
    if hint is not None:
        fits = len(hint) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, hint, strict=False)
        )
        if not fits:
            raise BuildError(
                f"--input-shape {spec.name}={','.join(map(str, hint))}: input {spec.name!r} "
                f"has shape {spec.describe_shape()}"
            )
        return tuple(hint)
    shape = []
    guessed = False
    dim_names = spec.dim_names if len(spec.dim_names) == len(spec.shape) else (None,) * len(
        spec.shape)
    for axis, (dim, dim_name) in enumerate(zip(spec.shape, dim_names, strict=True)):
        if dim is not None:
            shape.append(dim)
            continue
        if dim_name in named:
            shape.append(named[dim_name])
            continue
        if axis == 0:  # the batch: a few rows check more than one (one model input only,
            size = DEFAULT_SAMPLE_ROWS if input_count == 1 else 1  # so batches agree)
        else:
            size = 1
            guessed = True
            made.guessed.append(f"dim {axis} of {spec.name!r} (1)")
        if dim_name:
            named[dim_name] = size
        shape.append(size)
    if guessed:
        example = ",".join("N" if d is None else str(d) for d in spec.shape)
        made.options.append(f"--input-shape {spec.name}={example}")
    return tuple(shape)


def _metadata(engine: Engine) -> tuple[dict[str, str], list[str]]:
    """The model's metadata that fits the manifest's bounds, and a warning per key left out."""
    kept: dict[str, str] = {}
    warnings = []
    for key, value in sorted(engine.metadata.items()):
        if len(kept) == MAX_METADATA_KEYS:
            warnings.append(f"model metadata: more than {MAX_METADATA_KEYS} keys, "
                            f"{key!r} and the keys after it are left out")
            break
        try:
            msgspec.convert({key: value}, ModelMetadata)
        except msgspec.ValidationError as exc:
            warnings.append(f"model metadata {key[:64]!r} left out: {exc}")
            continue
        kept[key] = value
    return kept, warnings


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """What ``np.savez_compressed`` writes, with fixed timestamps (deterministic bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


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
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, float | int] | None = None,
    max_samples_bytes: int = DEFAULT_MAX_SAMPLES_BYTES,
    summaries: Mapping[str, SummaryChoice | str] | None = None,
    drift_thresholds: Mapping[str, float] | None = None,
) -> BuiltBundle:
    """Build ``out_dir/NAME-VERSION.bundle``; every refusal is a one-line :class:`BuildError`.

    ``input_shapes`` / ``input_values`` (by input name) are the hints the health-check
    samples are made from when ``samples`` is not given; see the module docstring.
    ``baseline`` is the training inputs (``fleet.baseline_build``), ``summaries`` the
    operator's summary per tensor name (``"image:nhwc"``, ``"stats"``, ``"none"``...) where
    the automatic choice is not wanted."""
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
    warnings: list[str] = []
    with loaded as engine:
        baseline_data = load_baseline_data(baseline, engine) if baseline is not None else None
        baseline_doc = None
        if baseline_data is not None:
            computed = compute_baseline(engine, baseline_data, summaries=summaries)
            baseline_doc = computed.baseline
            warnings.extend(computed.warnings)
            if drift_thresholds:
                baseline_doc = msgspec.structs.replace(
                    baseline_doc, thresholds=_threshold_spec(drift_thresholds))
        elif summaries or drift_thresholds:
            raise BuildError("--summary and --drift-threshold are about the --baseline: give "
                             "a --baseline too")
        made = _sample_inputs(engine, samples, baseline_data, input_shapes or {},
                              input_values or {})
        inputs = made.inputs
        try:
            expected = engine.infer(inputs)
        except ValueError as exc:
            raise BuildError(f"samples do not fit the model: {one_line(exc)}") from None
        except EngineError as exc:
            if made.guessed:
                raise BuildError(
                    f"the model failed on health-check samples with guessed "
                    f"{', '.join(made.guessed)}: pass {' and '.join(made.options)} "
                    f"(or real inputs with --samples); the runtime said: {one_line(exc)}"
                ) from None
            hint = (
                "" if samples is not None
                else " made from --input-shape/--input-value (check them, or give real "
                "inputs with --samples)" if input_shapes or input_values
                else " (give real inputs with --samples)"
            )
            raise BuildError(
                f"the model failed on its health-check samples{hint}: {one_line(exc)}"
            ) from None
        prepared = {spec.name: np.asarray(inputs[spec.name]).astype(spec.dtype)
                    for spec in engine.inputs}
        input_schema = [_schema(s, allow_nan) for s in engine.inputs]
        output_schema = [_schema(s) for s in engine.outputs]
        metadata, metadata_warnings = _metadata(engine)
        warnings.extend(metadata_warnings)
    if made.guessed:
        warnings.insert(0, f"health-check samples guessed {', '.join(made.guessed)}: the "
                           f"check only means something for real sizes and values; pass "
                           f"{' and '.join(made.options)}")

    arrays = {
        **{SAMPLE_INPUT_PREFIX + k: v for k, v in prepared.items()},
        **{SAMPLE_EXPECTED_PREFIX + k: v for k, v in expected.items()},
    }
    inflated = sum(array.nbytes for array in arrays.values())
    if inflated > MAX_SAMPLES_BYTES:
        raise BuildError(
            f"health-check samples hold {inflated / 2**20:.1f} MiB of arrays, over the "
            f"{MAX_SAMPLES_BYTES // 2**20} MiB a device will unpack: give smaller inputs "
            "(--input-shape with fewer rows or a smaller size, or --samples)"
        )
    samples_bytes = _npz(arrays)
    if len(samples_bytes) > max_samples_bytes:
        raise BuildError(
            f"health-check samples are {len(samples_bytes) / 2**20:.1f} MiB compressed, over "
            f"the {max_samples_bytes / 2**20:g} MiB cap: give smaller inputs (--input-shape "
            "with fewer rows or a smaller size, or --samples), or raise --max-samples-mb"
        )
    members: dict[str, bytes] = {model_file: model_bytes, "samples.npz": samples_bytes}
    if baseline_doc is not None:
        members["baseline.json"] = to_json(baseline_doc)
        if len(members["baseline.json"]) > MAX_BASELINE_BYTES:
            raise BuildError(
                f"baseline.json of {len(members['baseline.json']) / 2**20:.1f} MiB is over "
                f"the {MAX_BASELINE_BYTES // 2**20} MiB a device reads: fewer features "
                "(summaries such as stats for the widest tensors)"
            )

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
        metadata=metadata,
    )
    try:
        manifest = validated(manifest)
    except MessageRejected as exc:
        raise BuildError(f"bundle manifest: {exc.detail}") from None
    manifest_data = manifest_bytes(manifest)
    if len(manifest_data) > MAX_MANIFEST_BYTES:
        raise BuildError(
            f"bundle manifest of {len(manifest_data)} bytes is over the {MAX_MANIFEST_BYTES} "
            "bytes a device reads (the model's metadata is the likely cause)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / manifest.target_name
    write_archive(path, {MANIFEST_NAME: manifest_data, **members})
    data = path.read_bytes()
    return BuiltBundle(path, manifest, hashlib.sha256(data).hexdigest(), len(data),
                       tuple(warnings))


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


def _threshold_spec(given: Mapping[str, float]) -> DriftThresholdSpec:
    """The model's drift thresholds as the contract carries them (refused out of range)."""
    try:
        return convert(DriftThresholdSpec, dict(given))
    except MessageRejected as exc:
        raise BuildError(f"--drift-threshold: {exc.detail}") from None


def member_bytes(path: Path, name: str, max_bytes: int) -> bytes:
    """One member of a built bundle, refused past ``max_bytes``."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.name != name:
                    continue
                if not member.isfile():
                    raise BuildError(f"{path}: {name} is not a file")
                if member.size > max_bytes:
                    raise BuildError(f"{path}: {name} of {member.size} bytes is too large")
                handle = tar.extractfile(member)
                assert handle is not None
                return handle.read()
    except tarfile.TarError as exc:
        raise BuildError(f"{path}: not a bundle: {exc}") from exc
    raise BuildError(f"{path}: has no member {name}")


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
