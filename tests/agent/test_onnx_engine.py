"""OnnxEngine on real onnxruntime sessions over models built by tests/fixtures/models.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import (
    Engine,
    EngineError,
    InputError,
    OnnxEngine,
    TensorSpec,
    load_engine,
    prepare_inputs,
)
from tests.fixtures.models import MlpModelFile, ModelFile, mlp_reference


@pytest.fixture
def mlp(onnx_mlp: MlpModelFile) -> Iterator[OnnxEngine]:
    with OnnxEngine(onnx_mlp.path) as engine:
        yield engine


@pytest.fixture
def two_input(onnx_two_input: ModelFile) -> Iterator[OnnxEngine]:
    with OnnxEngine(onnx_two_input.path) as engine:
        yield engine


def _input_error(engine: OnnxEngine, data: object) -> str:
    with pytest.raises(InputError) as caught:
        engine.infer(data)
    return str(caught.value)


@pytest.mark.parametrize("batch", [1, 7])
def test_outputs_match_numpy_reference(mlp: OnnxEngine, onnx_mlp: MlpModelFile, batch: int):
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)

    outputs = mlp.infer(x)

    assert list(outputs) == ["y"]
    assert outputs["y"].shape == (batch, 3)
    np.testing.assert_allclose(outputs["y"], mlp_reference(onnx_mlp.weights, x), atol=1e-5)


def test_specs_describe_the_model(mlp: OnnxEngine):
    assert mlp.inputs == [TensorSpec("x", "float32", (None, 4))]
    assert mlp.outputs == [TensorSpec("y", "float32", (None, 3))]
    assert mlp.providers == ["CPUExecutionProvider"]


def test_single_sample_gets_a_batch_dim(mlp: OnnxEngine, onnx_mlp: MlpModelFile):
    sample = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)

    outputs = mlp.infer(sample)

    assert outputs["y"].shape == (1, 3)
    np.testing.assert_allclose(
        outputs["y"], mlp_reference(onnx_mlp.weights, sample[None, :]), atol=1e-5
    )


def test_int_input_is_cast_to_float(mlp: OnnxEngine, onnx_mlp: MlpModelFile):
    rows = [[1, 2, 3, 4], [0, -1, 5, 2]]  # a nested list of ints -> int64 -> float32

    outputs = mlp.infer(rows)

    expected = mlp_reference(onnx_mlp.weights, np.array(rows, dtype=np.float32))
    np.testing.assert_allclose(outputs["y"], expected, atol=1e-5)


def test_float64_input_is_cast_to_float32(mlp: OnnxEngine, onnx_mlp: MlpModelFile):
    x = np.linspace(-1, 1, 8).reshape(2, 4)  # float64

    outputs = mlp.infer({"x": x})

    assert outputs["y"].dtype == np.float32
    expected = mlp_reference(onnx_mlp.weights, x.astype(np.float32))
    np.testing.assert_allclose(outputs["y"], expected, atol=1e-5)


def test_two_inputs_are_fed_by_name(two_input: OnnxEngine):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    outputs = two_input.infer({"scale": [[2], [3]], "x": x})

    np.testing.assert_array_equal(outputs["y"], x * np.array([[2.0], [3.0]], dtype=np.float32))


def test_wrong_feature_count_names_expected_and_given(mlp: OnnxEngine):
    message = _input_error(mlp, np.zeros((2, 5), dtype=np.float32))

    assert message == (
        "input 'x': expected shape (batch, 4), given (2, 5): feature count 5, expected 4"
    )


def test_wrong_feature_count_of_a_single_sample_names_the_given_shape(mlp: OnnxEngine):
    message = _input_error(mlp, [1.0, 2.0, 3.0])

    assert message == (
        "input 'x': expected shape (batch, 4), given (3,): feature count 3, expected 4"
    )


def test_wrong_rank_names_expected_and_given(mlp: OnnxEngine):
    message = _input_error(mlp, np.zeros((2, 4, 1), dtype=np.float32))

    assert message == "input 'x': expected shape (batch, 4), given (2, 4, 1): rank 3, expected 2"


def test_float_for_int_input_is_refused(two_input: OnnxEngine):
    message = _input_error(two_input, {"x": np.zeros((1, 4), np.float32), "scale": [[1.5]]})

    assert message == "input 'scale': expected dtype int64, given float64"


def test_strings_are_refused(mlp: OnnxEngine):
    message = _input_error(mlp, ["abc", "def", "ghi", "jkl"])

    assert message == "input 'x': expected dtype float32, given text"


def test_unknown_input_name_names_expected_and_given(mlp: OnnxEngine):
    message = _input_error(mlp, {"x": np.zeros((1, 4)), "extra": [1.0]})

    assert "expected ['x'], given ['extra', 'x']" in message
    assert "unknown ['extra']" in message


def test_missing_input_names_expected_and_given(two_input: OnnxEngine):
    message = _input_error(two_input, {"x": np.zeros((1, 4), np.float32)})

    assert "expected ['x', 'scale'], given ['x']" in message
    assert "missing ['scale']" in message


def test_single_array_for_a_two_input_model_is_refused(two_input: OnnxEngine):
    message = _input_error(two_input, np.zeros((1, 4), np.float32))

    assert "model has 2 inputs ['x', 'scale']" in message


def test_ragged_list_is_refused(mlp: OnnxEngine):
    message = _input_error(mlp, [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]])

    assert message.startswith("input 'x': expected shape (batch, 4), given nested lists")


def test_nan_is_refused_where_the_schema_forbids_it(mlp: OnnxEngine):
    batch = np.ones((8, 4), np.float32)
    batch[5, 2] = np.nan
    assert np.isnan(mlp.infer(batch)["y"]).any()  # allowed by default: garbage out
    mlp.refuse_nan(["x"])
    assert "1 NaN value(s) given" in _input_error(mlp, batch)  # the fast path (float32)
    assert "1 NaN value(s) given" in _input_error(mlp, batch.astype(np.float64))  # converted


def _strided_view(x: np.ndarray) -> np.ndarray:
    wide = np.zeros((x.shape[0], 2 * x.shape[1]), x.dtype)
    wide[:, ::2] = x
    return wide[:, ::2]


LAYOUTS = {
    "c_order": lambda x: x,
    "big_endian": lambda x: x.astype(">f4"),
    "fortran_order": np.asfortranarray,
    "strided_view": _strided_view,
    "float64": lambda x: x.astype(np.float64),
    "list": lambda x: x.tolist(),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_of_the_same_values_gives_the_same_answer(
    mlp: OnnxEngine, onnx_mlp: MlpModelFile, layout: str
):
    """Engine.infer checks the common request inline and sends the rest through
    prepare_inputs; both must accept the same values, answer the same, and refuse NaN."""
    mlp.refuse_nan(["x"])
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    arrange = LAYOUTS[layout]

    answer = mlp.infer(arrange(x))["y"]

    np.testing.assert_allclose(answer, mlp_reference(onnx_mlp.weights, x), atol=1e-5)
    x[4, 1] = np.nan
    assert "1 NaN value(s) given" in _input_error(mlp, arrange(x))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_nan_check_is_exact_for_infinities_and_overflow(dtype: str):
    """The check sums squares; +inf and -inf together, or squares past the dtype's max,
    must not read as NaN, and one NaN among them must."""
    spec = TensorSpec("x", dtype, (None, 4), allow_nan=False)
    big = np.finfo(dtype).max
    extremes = np.array([[np.inf, -np.inf, big, -big]] * 3, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_inputs([spec], extremes)["x"] is extremes  # accepted as it is
        extremes[1, 3] = np.nan
        with pytest.raises(InputError, match="1 NaN value"):
            prepare_inputs([spec], extremes)
    assert all("overflow" in str(w.message) for w in caught)  # the documented warning only
    empty = np.zeros((0, 4), dtype)
    assert prepare_inputs([spec], empty)["x"].shape == (0, 4)


def test_failure_inside_the_runtime_raises_engine_error(two_input: OnnxEngine):
    """Each input fits its own spec, but the batches disagree: only ORT can tell."""
    with pytest.raises(EngineError, match=r"inference failed for two_input\.onnx") as caught:
        two_input.infer({"x": np.ones((2, 4), np.float32), "scale": np.ones((3, 1), np.int64)})
    assert not isinstance(caught.value, InputError)
    assert type(caught.value.__cause__).__module__.startswith("onnxruntime")
    assert two_input.infer({"x": np.ones((1, 4), np.float32),  # the engine still works
                            "scale": np.full((1, 1), 2, np.int64)})["y"].tolist() == [[2.0] * 4]


@pytest.mark.parametrize(
    ("shape", "given", "fits"),
    [
        ((None, 4), (7, 4), True),
        ((None, 4), (7, 5), False),
        ((2, None, 3), (2, 9, 3), True),  # a dynamic dim after the first
        ((2, None, 3), (2, 9, 4), False),
        ((2, None, 3), (3, 9, 3), False),  # a fixed leading dim
        ((2, 3), (2, 3), True),
        ((2, 3), (1, 3), False),
    ],
)
def test_shapes_are_matched_dim_by_dim(shape, given, fits):
    spec = TensorSpec("x", "float32", shape)
    array = np.zeros(given, np.float32)
    if fits:
        assert prepare_inputs([spec], array)["x"] is array  # no copy
    else:
        with pytest.raises(InputError, match=r"expected shape"):
            prepare_inputs([spec], array)


def test_input_error_is_a_value_error_and_an_engine_error():
    assert issubclass(InputError, ValueError)
    assert issubclass(InputError, EngineError)


def test_warmup_runs_a_zero_batch(mlp: OnnxEngine):
    mlp.warmup()


def test_thread_counts_are_configurable(onnx_mlp: MlpModelFile):
    with OnnxEngine(onnx_mlp.path, intra_op_threads=1, inter_op_threads=1) as engine:
        assert engine.infer(np.zeros(4, np.float32))["y"].shape == (1, 3)


def test_corrupt_model_raises_engine_error(tmp_path: Path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf" * 10)

    with pytest.raises(EngineError, match=r"cannot load ONNX model .*corrupt\.onnx") as caught:
        OnnxEngine(path)
    assert caught.value.__cause__ is not None  # raised from the onnxruntime error


def test_missing_model_file_raises_engine_error(tmp_path: Path):
    with pytest.raises(EngineError, match="no such file"):
        OnnxEngine(tmp_path / "absent.onnx")


def test_unavailable_provider_is_refused(onnx_mlp: MlpModelFile):
    with pytest.raises(EngineError, match=r"\['NoSuchExecutionProvider'\] not available"):
        OnnxEngine(onnx_mlp.path, providers=["NoSuchExecutionProvider"])


def test_closed_engine_raises_runtime_error(onnx_mlp: MlpModelFile):
    engine = OnnxEngine(onnx_mlp.path)
    engine.close()
    engine.close()  # idempotent

    assert engine.closed
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer(np.zeros((1, 4), np.float32))
    with pytest.raises(RuntimeError, match="closed"):
        engine.warmup()
    with pytest.raises(RuntimeError, match="closed"), engine:
        pass


def test_a_closed_engine_refuses_even_a_request_that_needs_no_conversion():
    """The inline check in Engine.infer must not outlive close(), whatever the backend."""

    class Echo(Engine):
        def _run(self, feeds):
            return dict(feeds)

        def _close(self):
            pass

    engine = Echo([TensorSpec("x", "float32", (None, 4))], [TensorSpec("x", "float32",
                                                                      (None, 4))])
    ready = np.zeros((2, 4), np.float32)
    assert engine.infer(ready)["x"] is ready  # the inline path, no copy
    engine.close()

    with pytest.raises(RuntimeError, match="Echo is closed"):
        engine.infer(ready)


def test_context_manager_closes_the_engine(onnx_mlp: MlpModelFile):
    with OnnxEngine(onnx_mlp.path) as engine:
        assert not engine.closed
    assert engine.closed


def test_load_engine_picks_onnx_by_suffix(onnx_mlp: MlpModelFile):
    with load_engine(onnx_mlp.path, providers=["CPUExecutionProvider"]) as engine:
        assert isinstance(engine, OnnxEngine)


def test_load_engine_refuses_unknown_suffix(tmp_path: Path):
    with pytest.raises(EngineError, match=r"unsupported model file 'model\.pt'"):
        load_engine(tmp_path / "model.pt")


def test_importing_the_runtime_package_does_not_import_onnxruntime():
    code = "import sys, agent.runtime; sys.exit('onnxruntime' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
