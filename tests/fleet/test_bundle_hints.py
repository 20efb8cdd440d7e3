"""``edge-fleet bundle build`` for models whose schema does not say what they take.

The health check means something only if its samples are inputs the model really takes:
shape and value hints make them, guesses are named in a warning, and a guess the model
cannot run is refused in one line that says which option to pass. Samples are deflated
and capped; the model's metadata goes into the manifest.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.contract import MAX_METADATA_VALUE_CHARS
from agent.health import load_samples, open_checked_engine
from fleet.bundle_build import BuildError, build_bundle, manifest_json
from tests.fixtures.models import build_detector_onnx, build_mlp_onnx, build_vad_onnx
from tests.fixtures.processes import console_script


def _fleet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "80"}
    return subprocess.run([*console_script("edge-fleet"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _samples(path: Path) -> dict[str, np.ndarray]:
    with tarfile.open(path) as tar:
        data = tar.extractfile("samples.npz").read()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def test_hints_give_the_samples_the_model_takes_and_the_device_reproduces(tmp_path):
    build_vad_onnx(tmp_path / "vad.onnx")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "vad.onnx"), "--name", "vad",
                  "--version", "1", "--input-shape", "input=2,512", "--input-value", "sr=16000",
                  "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # nothing was guessed
    path = tmp_path / "out" / "vad-1.bundle"
    samples = _samples(path)
    assert samples["input:input"].shape == (2, 512)
    assert samples["input:state"].shape == (2, 2, 128)  # its batch is the audio's: same name
    assert samples["input:sr"].shape == () and int(samples["input:sr"]) == 16000
    assert samples["expected:output"].shape == (2, 1)
    manifest = extract_bundle(path, tmp_path / "slot", 1 << 26)
    open_checked_engine(tmp_path / "slot", manifest).close()


def test_a_guessed_dim_or_value_is_a_warning_naming_the_input_and_the_option(tmp_path):
    build_vad_onnx(tmp_path / "vad.onnx")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "vad.onnx"), "--name", "vad",
                  "--version", "1", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert "dim 1 of 'input'" in warnings[0] and "--input-shape input=N,N" in warnings[0]
    assert "'sr'" in warnings[0] and "--input-value sr=V" in warnings[0]
    assert "'state'" not in warnings[0]  # its only dynamic dim is the batch, named alike


def test_a_guess_the_model_cannot_run_is_refused_in_one_line_naming_the_option(tmp_path):
    build_detector_onnx(tmp_path / "det.onnx")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "det.onnx"), "--name", "det",
                  "--version", "1", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "dim 2 of 'x' (1), dim 3 of 'x' (1)" in lines[0]
    assert "--input-shape x=N,3,N,N" in lines[0] and "Reshape" in lines[0]
    assert "Traceback" not in done.stderr and "onnxruntime_src" not in done.stderr
    assert not (tmp_path / "out").exists()
    fixed = _fleet(tmp_path, "bundle", "build", str(tmp_path / "det.onnx"), "--name", "det",
                   "--version", "1", "--input-shape", "x=1,3,64,96", "--out", str(tmp_path / "out"))
    assert fixed.returncode == 0, fixed.stderr
    assert _samples(tmp_path / "out" / "det-1.bundle")["expected:maps"].shape == (1, 1, 2, 3)


def test_a_hinted_value_the_model_refuses_is_refused_in_one_line(tmp_path):
    build_vad_onnx(tmp_path / "vad.onnx")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "vad.onnx"), "--name", "vad",
                  "--version", "1", "--input-shape", "input=1,512", "--input-value", "sr=44100",
                  "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--input-shape/--input-value" in done.stderr and "Gather" in done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--input-shape", "x=1,3,a"), "expected NAME=D1,D2,..."),
        (("--input-shape", "x=1,3,64"), "input 'x' has shape (batch, 3, ?, ?)"),
        (("--input-shape", "x=1,4,64,64"), "input 'x' has shape (batch, 3, ?, ?)"),
        (("--input-shape", "image=1,3,64,64"), "the model has no input image (its inputs: x)"),
        (("--input-value", "x"), "expected NAME=NUMBER"),
    ],
)
def test_a_hint_that_does_not_fit_is_refused_in_one_line(tmp_path, args, said):
    build_detector_onnx(tmp_path / "det.onnx")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "det.onnx"), "--name", "det",
                  "--version", "1", *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_integer_input_takes_only_an_integer_value(tmp_path):
    build_vad_onnx(tmp_path / "vad.onnx")
    with pytest.raises(BuildError, match=r"input 'sr' is int64, give an integer"):
        build_bundle(tmp_path / "vad.onnx", name="vad", version=1, out_dir=tmp_path / "out",
                     input_shapes={"input": (1, 512)}, input_values={"sr": 16000.5})


def test_samples_are_deflated_and_smaller_than_stored(tmp_path):
    build_detector_onnx(tmp_path / "det.onnx")
    built = build_bundle(tmp_path / "det.onnx", name="det", version=1, out_dir=tmp_path / "out",
                         input_shapes={"x": (1, 3, 256, 256)})
    with tarfile.open(built.path) as tar:
        data = tar.extractfile("samples.npz").read()
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert {info.compress_type for info in infos} == {zipfile.ZIP_DEFLATED}
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    stored = sum(info.file_size for info in infos)
    assert len(data) < 0.7 * stored
    manifest = extract_bundle(built.path, tmp_path / "slot", 1 << 26)
    inputs, expected = load_samples(tmp_path / "slot" / "samples.npz")
    assert inputs["x"].shape == (1, 3, 256, 256) and expected["maps"].shape == (1, 1, 8, 8)
    open_checked_engine(tmp_path / "slot", manifest).close()


def test_samples_over_the_cap_are_refused_naming_the_option(tmp_path):
    build_detector_onnx(tmp_path / "det.onnx")
    with pytest.raises(BuildError, match=r"over the 0.5 MiB cap.*--max-samples-mb"):
        build_bundle(tmp_path / "det.onnx", name="det", version=1, out_dir=tmp_path / "out",
                     input_shapes={"x": (1, 3, 512, 512)}, max_samples_bytes=512 * 1024)
    with pytest.raises(BuildError, match=r"over the 64 MiB a device will unpack"):
        build_bundle(tmp_path / "det.onnx", name="det", version=1, out_dir=tmp_path / "out",
                     input_shapes={"x": (2, 3, 2048, 2048)}, max_samples_bytes=1 << 30)
    assert not (tmp_path / "out").exists()


def test_samples_stored_uncompressed_by_older_builds_still_pass_the_health_check(tmp_path):
    build_mlp_onnx(tmp_path / "m.onnx")
    built = build_bundle(tmp_path / "m.onnx", name="m", version=1, out_dir=tmp_path / "out")
    manifest = extract_bundle(built.path, tmp_path / "slot", 1 << 26)
    inputs, expected = load_samples(tmp_path / "slot" / "samples.npz")
    stored = io.BytesIO()
    np.savez(stored, **{f"input:{k}": v for k, v in inputs.items()},
             **{f"expected:{k}": v for k, v in expected.items()})
    (tmp_path / "slot" / "samples.npz").write_bytes(stored.getvalue())
    assert load_samples(tmp_path / "slot" / "samples.npz")[0]["x"].shape == (8, 4)
    open_checked_engine(tmp_path / "slot", manifest).close()


def test_model_metadata_goes_into_the_manifest_within_bounds(tmp_path):
    metadata = {"character_dict": "a\nb\nc", "too_long": "x" * (MAX_METADATA_VALUE_CHARS + 1),
                "control": "bell\x07"}
    build_detector_onnx(tmp_path / "det.onnx", metadata=metadata)
    built = build_bundle(tmp_path / "det.onnx", name="det", version=1, out_dir=tmp_path / "out",
                         input_shapes={"x": (1, 3, 32, 32)})
    assert built.manifest.metadata == {"character_dict": "a\nb\nc"}
    assert manifest_json(built.path, 1 << 20)["metadata"] == {"character_dict": "a\nb\nc"}
    left_out = [w for w in built.warnings if "left out" in w]
    assert len(left_out) == 2 and any("'too_long'" in w for w in left_out)


def test_a_model_without_metadata_writes_no_metadata_field(tmp_path):
    """Agents from before the field refuse unknown fields: bundles without metadata must
    stay readable by them."""
    build_mlp_onnx(tmp_path / "m.onnx")
    built = build_bundle(tmp_path / "m.onnx", name="m", version=1, out_dir=tmp_path / "out")
    assert "metadata" not in manifest_json(built.path, 1 << 20)


def test_a_tflite_model_needing_a_custom_op_is_refused_in_one_line(tmp_path):
    pytest.importorskip("ai_edge_litert")
    _custom_op_tflite(tmp_path / "custom.tflite", "EdgeTestOp")
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "custom.tflite"), "--name", "c",
                  "--version", "1", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "needs the custom operator 'EdgeTestOp'" in done.stderr


def _custom_op_tflite(path: Path, op: str) -> None:
    """x float32 [1, 4] -> a CUSTOM operator named ``op`` -> y: no runtime registers it."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def tensor(name: str):
        result = schema.TensorT()
        result.name, result.type, result.shape, result.buffer = (
            name, schema.TensorType.FLOAT32, [1, 4], 0)
        return result

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = op, 1
    operator = schema.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, [0], [1]
    subgraph = schema.SubGraphT()
    subgraph.name, subgraph.tensors = "custom", [tensor("x"), tensor("y")]
    subgraph.inputs, subgraph.outputs, subgraph.operators = [0], [1], [operator]
    model = schema.ModelT()
    model.version, model.description = 3, "edgefleet-tests"
    model.operatorCodes, model.subgraphs, model.buffers = [code], [subgraph], [schema.BufferT()]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
