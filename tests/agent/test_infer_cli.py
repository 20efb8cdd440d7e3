"""``edge-agent infer`` as a user runs it: a real process, real model files, real onnxruntime.

The acceptance check: on a model built with onnx.helper, the CLI prints the same numbers as a
direct ``onnxruntime.InferenceSession`` run on the same input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.fixtures.models import MlpModelFile, ModelFile

_CONSOLE_SCRIPT = Path(sys.executable).parent / "edge-agent"


def _edge_agent_infer(model: Path, data: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent infer MODEL --input DATA [OPTIONS]``, the installed console script."""
    argv = [str(_CONSOLE_SCRIPT), "infer", str(model), "--input", str(data), *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _direct_session(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _cli_outputs(result: subprocess.CompletedProcess[str]) -> dict[str, np.ndarray]:
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    outputs = {name: np.array(value, np.float32) for name, value in printed["outputs"].items()}
    assert printed["shapes"] == {name: list(value.shape) for name, value in outputs.items()}
    return outputs


def test_json_input_gives_the_same_numbers_as_a_direct_session(
    onnx_mlp: MlpModelFile, tmp_path: Path
):
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(x.tolist()))

    result = _edge_agent_infer(onnx_mlp.path, data)

    expected = _direct_session(onnx_mlp.path, {"x": x})
    outputs = _cli_outputs(result)
    assert json.loads(result.stdout)["model"] == str(onnx_mlp.path)
    assert outputs.keys() == expected.keys()
    np.testing.assert_array_equal(outputs["y"], expected["y"])


def test_json_object_feeds_inputs_by_name(onnx_two_input: ModelFile, tmp_path: Path):
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    scale = np.array([[2], [-1]], dtype=np.int64)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"x": x.tolist(), "scale": scale.tolist()}))

    outputs = _cli_outputs(_edge_agent_infer(onnx_two_input.path, data))

    expected = _direct_session(onnx_two_input.path, {"x": x, "scale": scale})
    np.testing.assert_array_equal(outputs["y"], expected["y"])


def test_npy_input_gives_the_same_numbers_as_a_direct_session(
    onnx_mlp: MlpModelFile, tmp_path: Path
):
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    data = tmp_path / "data.npy"
    np.save(data, x)

    outputs = _cli_outputs(_edge_agent_infer(onnx_mlp.path, data))

    np.testing.assert_array_equal(outputs["y"], _direct_session(onnx_mlp.path, {"x": x})["y"])


def test_wrong_feature_count_exits_2_naming_expected_and_given(
    onnx_mlp: MlpModelFile, tmp_path: Path
):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]]))

    result = _edge_agent_infer(onnx_mlp.path, data)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "error: input 'x': expected shape (batch, 4), given (2, 5): feature count 5, expected 4"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("absent.json", None, "not found"),
        ("data.json", "[[1.0, 2.0", "invalid JSON"),
        ("data.csv", "1,2,3,4", "unsupported type .csv"),
    ],
)
def test_bad_input_file_exits_2_with_one_line(
    onnx_mlp: MlpModelFile, tmp_path: Path, name: str, content: str | None, expected: str
):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)

    result = _edge_agent_infer(onnx_mlp.path, data)

    assert result.returncode == 2
    assert result.stderr.startswith("error: input file ")
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1


def test_corrupt_model_exits_1(tmp_path: Path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(b"not an onnx model")
    data = tmp_path / "data.json"
    data.write_text("[1, 2, 3, 4]")

    result = _edge_agent_infer(model, data)

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot load ONNX model ")
    assert "Traceback" not in result.stderr


def test_thread_and_provider_options_give_the_same_numbers(
    onnx_mlp: MlpModelFile, tmp_path: Path
):
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    data = tmp_path / "data.npy"
    np.save(data, x)

    result = _edge_agent_infer(onnx_mlp.path, data, "--threads", "1",
                               "--provider", "CPUExecutionProvider")

    outputs = _cli_outputs(result)
    np.testing.assert_array_equal(outputs["y"], _direct_session(onnx_mlp.path, {"x": x})["y"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--provider", "NoSuchProvider"), "error: --provider: execution provider(s) "
                                           "['NoSuchProvider'] not available"),
        (("--threads", "0"), "error: --threads must be at least 1, given 0"),
    ],
)
def test_wrong_engine_options_exit_2_with_one_line(
    onnx_mlp: MlpModelFile, tmp_path: Path, options: tuple[str, ...], message: str
):
    data = tmp_path / "data.json"
    data.write_text("[1, 2, 3, 4]")

    result = _edge_agent_infer(onnx_mlp.path, data, *options)

    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
