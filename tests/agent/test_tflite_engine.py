"""TfliteEngine on the real TFLite interpreter, checked against the ONNX twin of the same MLP.

``tflite_mlp`` writes one set of weights both as ONNX and as a TFLite flatbuffer, so every
parity test compares two real runtimes with the plain numpy reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import (
    Engine,
    EngineError,
    InputError,
    OnnxEngine,
    TensorSpec,
    TfliteEngine,
    load_engine,
)
from tests.fixtures.models import mlp_reference
from tests.fixtures.tflite_models import TfliteMlpFiles

_CONSOLE_SCRIPT = Path(sys.executable).parent / "edge-agent"
_ATOL = 1e-5


@pytest.fixture
def tflite(tflite_mlp: TfliteMlpFiles) -> Iterator[TfliteEngine]:
    with TfliteEngine(tflite_mlp.tflite_path) as engine:
        yield engine


@pytest.fixture
def onnx(tflite_mlp: TfliteMlpFiles) -> Iterator[OnnxEngine]:
    with OnnxEngine(tflite_mlp.onnx_path) as engine:
        yield engine


def _batch(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([size, seed]).standard_normal((size, 4)).astype(np.float32)


def _input_error(engine: Engine, data: object) -> str:
    with pytest.raises(InputError) as caught:
        engine.infer(data)
    return str(caught.value)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnx_and_tflite_twins_both_match_the_numpy_reference(
    tflite: TfliteEngine, onnx: OnnxEngine, tflite_mlp: TfliteMlpFiles, batch: int
):
    x = _batch(batch)
    expected = mlp_reference(tflite_mlp.weights, x)

    from_tflite = tflite.infer(x)
    from_onnx = onnx.infer(x)

    assert list(from_tflite) == list(from_onnx) == ["y"]
    assert from_tflite["y"].shape == from_onnx["y"].shape == (batch, 3)
    assert from_tflite["y"].dtype == np.float32
    np.testing.assert_allclose(from_tflite["y"], expected, atol=_ATOL)
    np.testing.assert_allclose(from_onnx["y"], expected, atol=_ATOL)


def test_alternating_batch_sizes_on_one_engine_resize_back_and_forth(
    tflite: TfliteEngine, tflite_mlp: TfliteMlpFiles
):
    for step, batch in enumerate([1, 7, 256, 1, 7, 7, 3, 256, 1]):
        x = _batch(batch, seed=step)

        y = tflite.infer(x)["y"]

        assert y.shape == (batch, 3)
        np.testing.assert_allclose(y, mlp_reference(tflite_mlp.weights, x), atol=_ATOL)


def test_specs_read_the_dynamic_batch_from_the_shape_signature(
    tflite: TfliteEngine, onnx: OnnxEngine
):
    assert tflite.inputs == [TensorSpec("x", "float32", (None, 4))]
    assert tflite.outputs == [TensorSpec("y", "float32", (None, 3))]
    assert tflite.inputs == onnx.inputs
    assert tflite.outputs == onnx.outputs
    assert tflite.runtime == "ai_edge_litert"


def test_single_sample_gets_a_batch_dim(tflite: TfliteEngine, tflite_mlp: TfliteMlpFiles):
    sample = [0.5, -1.0, 2.0, 0.25]

    y = tflite.infer(sample)["y"]

    expected = mlp_reference(tflite_mlp.weights, np.array([sample], dtype=np.float32))
    np.testing.assert_allclose(y, expected, atol=_ATOL)


def test_outputs_are_owned_copies_not_views_into_the_interpreter(
    tflite: TfliteEngine, tflite_mlp: TfliteMlpFiles
):
    first_x, second_x = _batch(5, seed=1), _batch(5, seed=2)

    first = tflite.infer(first_x)["y"]
    tflite.infer(second_x)  # same shape: the interpreter reuses its buffers
    first_again = first.copy()
    first[:] = 0.0  # writable, and writing to it must not disturb the engine

    assert first.flags.owndata
    np.testing.assert_allclose(first_again, mlp_reference(tflite_mlp.weights, first_x), atol=_ATOL)
    np.testing.assert_allclose(
        tflite.infer(second_x)["y"], mlp_reference(tflite_mlp.weights, second_x), atol=_ATOL
    )


def test_wrong_feature_count_gives_the_same_message_as_onnx(tflite: TfliteEngine, onnx: OnnxEngine):
    bad = np.zeros((2, 5), dtype=np.float32)

    message = _input_error(tflite, bad)

    assert message == (
        "input 'x': expected shape (batch, 4), given (2, 5): feature count 5, expected 4"
    )
    assert message == _input_error(onnx, bad)


def test_string_input_gives_the_same_message_as_onnx(tflite: TfliteEngine, onnx: OnnxEngine):
    strings = ["abc", "def", "ghi", "jkl"]

    message = _input_error(tflite, strings)

    assert message == "input 'x': expected dtype float32, given text"
    assert message == _input_error(onnx, strings)


def test_concurrent_infer_from_8_threads_on_one_engine_gives_correct_results(
    tflite: TfliteEngine, tflite_mlp: TfliteMlpFiles
):
    # Different batch sizes per request, so unserialized calls would also race on resizes.
    requests = [_batch(1 + (i * 37) % 64, seed=i) for i in range(400)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda x: tflite.infer(x)["y"], requests))

    for x, y in zip(requests, results, strict=True):
        np.testing.assert_allclose(y, mlp_reference(tflite_mlp.weights, x), atol=_ATOL)


@pytest.mark.parametrize(
    "content",
    [b"not a tflite model " * 20, b"", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 40],
    ids=["garbage", "empty", "truncated"],
)
def test_corrupt_model_raises_engine_error_from_the_runtime_error(tmp_path: Path, content: bytes):
    path = tmp_path / "corrupt.tflite"
    path.write_bytes(content)

    with pytest.raises(EngineError, match=r"cannot load TFLite model .*corrupt\.tflite") as caught:
        TfliteEngine(path)
    assert isinstance(caught.value.__cause__, ValueError | RuntimeError)


def test_missing_model_file_raises_engine_error(tmp_path: Path):
    with pytest.raises(EngineError, match="no such file"):
        TfliteEngine(tmp_path / "absent.tflite")


def test_invalid_thread_count_raises_engine_error(tflite_mlp: TfliteMlpFiles):
    with pytest.raises(EngineError, match="num_threads") as caught:
        TfliteEngine(tflite_mlp.tflite_path, num_threads=0)
    assert isinstance(caught.value.__cause__, ValueError)


def test_thread_count_is_configurable(tflite_mlp: TfliteMlpFiles):
    x = _batch(16)
    with load_engine(tflite_mlp.tflite_path, num_threads=2) as engine:
        y = engine.infer(x)["y"]

    np.testing.assert_allclose(y, mlp_reference(tflite_mlp.weights, x), atol=_ATOL)


def test_load_engine_picks_tflite_by_suffix(tflite_mlp: TfliteMlpFiles):
    with load_engine(tflite_mlp.tflite_path, providers=None) as engine:
        assert isinstance(engine, TfliteEngine)


@pytest.mark.parametrize(
    "options",
    [{"providers": ["CPUExecutionProvider"]}, {"intra_op_threads": 2}],
    ids=["providers", "intra_op_threads"],
)
def test_load_engine_refuses_onnx_only_options_for_tflite(
    tflite_mlp: TfliteMlpFiles,
    options: dict[str, object],
):
    with pytest.raises(EngineError, match="ONNX Runtime option"):
        load_engine(tflite_mlp.tflite_path, **options)


def test_warmup_runs_a_zero_batch(tflite: TfliteEngine):
    tflite.warmup()


def test_closed_engine_raises_runtime_error(tflite_mlp: TfliteMlpFiles):
    engine = TfliteEngine(tflite_mlp.tflite_path)
    engine.close()
    engine.close()  # idempotent

    assert engine.closed
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer(_batch(1))


def test_importing_the_runtime_package_does_not_import_a_tflite_runtime():
    code = (
        "import sys, agent.runtime, agent.runtime.tflite_engine; "
        "sys.exit('ai_edge_litert' in sys.modules or 'tflite_runtime' in sys.modules)"
    )

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_missing_runtime_is_an_engine_error_naming_both_packages(
    tflite_mlp: TfliteMlpFiles,
):
    # A real process where neither package can be imported (None in sys.modules blocks it).
    code = (
        "import sys; sys.modules['ai_edge_litert'] = sys.modules['tflite_runtime'] = None\n"
        "from agent.runtime import EngineError, load_engine\n"
        "try:\n"
        "    load_engine(sys.argv[1])\n"
        "except EngineError as exc:\n"
        "    print(exc)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code, str(tflite_mlp.tflite_path)],
        capture_output=True,
        text=True,
        check=True,
    )

    assert "install edgefleet[tflite] (ai-edge-litert) or tflite-runtime" in result.stdout


def _edge_agent_infer(model: Path, data: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(_CONSOLE_SCRIPT), "infer", str(model), "--input", str(data)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_cli_prints_the_numpy_reference_for_both_twins(
    tflite_mlp: TfliteMlpFiles,
    tmp_path: Path,
    runtime: str,
):
    x = _batch(3, seed=7)
    data = tmp_path / "x.json"
    data.write_text(json.dumps(x.tolist()))
    model = tflite_mlp.tflite_path if runtime == "tflite" else tflite_mlp.onnx_path

    result = _edge_agent_infer(model, data)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the runtime's INFO chatter is logged, not printed
    printed = json.loads(result.stdout)
    assert printed["model"] == str(model)
    assert printed["shapes"] == {"y": [3, 3]}
    np.testing.assert_allclose(
        np.array(printed["outputs"]["y"]), mlp_reference(tflite_mlp.weights, x), atol=_ATOL
    )


def test_cli_wrong_feature_count_on_a_tflite_model_exits_2_like_onnx(
    tflite_mlp: TfliteMlpFiles,
    tmp_path: Path,
):
    data = tmp_path / "x.json"
    data.write_text(json.dumps([[1.0, 2.0, 3.0, 4.0, 5.0]]))

    from_tflite = _edge_agent_infer(tflite_mlp.tflite_path, data)
    from_onnx = _edge_agent_infer(tflite_mlp.onnx_path, data)

    expected = (
        "error: input 'x': expected shape (batch, 4), given (1, 5): feature count 5, expected 4"
    )
    assert from_tflite.returncode == from_onnx.returncode == 2
    assert from_tflite.stdout == ""
    assert from_onnx.stderr.strip() == expected
    # LiteRT's C++ "INFO: Created TensorFlow Lite XNNPACK delegate" line is logged, not
    # printed (agent.runtime.native_log): the error is stderr's only line, as with ONNX.
    assert from_tflite.stderr.strip() == expected


@pytest.fixture(scope="session")
def tflite_runtime_on_numpy_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``tflite-runtime`` and the numpy < 2 it needs, as on an older device.

    Installed from PyPI with pip ``--target``, then put first on ``PYTHONPATH`` of a child
    process, so numpy 1.x shadows this environment's numpy 2. Without a package index the
    test skips with the reason, except under ``CI=true``, where it fails."""
    target = tmp_path_factory.mktemp("tflite-runtime")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-conflicts", "--target", str(target), "numpy<2", "tflite-runtime>=2.14"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if install.returncode != 0 or not (target / "tflite_runtime").is_dir():
        reason = f"cannot install tflite-runtime with numpy<2: {install.stderr.strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the tflite-runtime path must be tested)")
        pytest.skip(reason)
    return target


def test_tflite_runtime_on_numpy_1_gives_the_numpy_reference(
    tflite_runtime_on_numpy_1: Path, tflite_mlp: TfliteMlpFiles, tmp_path: Path
):
    """The fallback for devices that have tflite-runtime, not ai-edge-litert: a real
    tflite-runtime interpreter on numpy 1.x, dynamic batch sizes, the engine's checks."""
    inputs = {f"b{size}": _batch(size) for size in (1, 7, 256)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['ai_edge_litert'] = None  # as on a device that only has tflite-runtime\n"
        "from agent.runtime import InputError, load_engine\n"
        "engine = load_engine(sys.argv[1], num_threads=1)\n"
        "inputs = np.load(sys.argv[2])\n"
        "np.savez(sys.argv[3], **{k: engine.infer(inputs[k])['y'] for k in inputs.files})\n"
        "try:\n"
        "    engine.infer(np.ones((2, 5), np.float32))\n"
        "except InputError as exc:\n"
        "    refusal = str(exc)\n"
        "print(json.dumps({'runtime': engine.runtime, 'numpy': np.__version__,\n"
        "                  'refusal': refusal}))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{tflite_runtime_on_numpy_1}{os.pathsep}{repo}"}

    result = subprocess.run(
        [sys.executable, "-s", "-c", code, str(tflite_mlp.tflite_path),
         str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["runtime"] == "tflite_runtime"
    assert printed["numpy"].startswith("1.")
    assert printed["refusal"] == (
        "input 'x': expected shape (batch, 4), given (2, 5): feature count 5, expected 4"
    )
    with np.load(tmp_path / "outputs.npz") as outputs:
        for name, x in inputs.items():
            np.testing.assert_allclose(outputs[name], mlp_reference(tflite_mlp.weights, x),
                                       atol=_ATOL)


def test_cli_ignores_an_onnx_provider_for_a_tflite_model(tflite_mlp: TfliteMlpFiles,
                                                          tmp_path: Path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_batch(2).tolist()))
    argv = [str(_CONSOLE_SCRIPT), "infer", str(tflite_mlp.tflite_path), "--input", str(data),
            "--provider", "NoSuchProvider"]

    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    assert "--provider applies to ONNX models; ignored" in result.stderr
    np.testing.assert_allclose(json.loads(result.stdout)["outputs"]["y"],
                               mlp_reference(tflite_mlp.weights, _batch(2)), atol=_ATOL)
