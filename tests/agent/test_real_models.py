"""Models shaped like real edge models, served through the real endpoint and onnxruntime.

A Silero-VAD-like model (three inputs, one an int64 scalar, recurrent state; two outputs)
and an OCR-detector-like model (dynamic height and width, multiples of 32 only), built
into bundles with shape and value hints, unpacked into a slot and health-checked exactly
as the daemon does. What they need from the endpoint: binary answers for several outputs,
406 for an answer it cannot give, and the caller's error (422, a client error) for a value
the schema allows but the model refuses.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.contract import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    BundleManifest,
    MessageRejected,
    decode,
    manifest_bytes,
)
from agent.endpoint import InferenceEndpoint, _answer_format
from agent.health import open_checked_engine
from agent.installer import LoadedModel
from agent.npy import NpyError, dump_npz, load_npz
from agent.runtime import EngineError, RejectedInputError, load_engine
from agent.serving import ModelHost
from fleet.bundle_build import build_bundle
from tests.fixtures.models import (
    build_detector_onnx,
    build_vad_onnx,
    detector_reference,
    vad_reference,
)

NPY, NPZ = "application/x-npy", "application/x-npz"
DICTIONARY = "\n".join("abcdefghijklmnopqrstuvwxyz0123456789")


def _load(path: Path, slot: Path) -> LoadedModel:
    manifest = extract_bundle(path, slot, 1 << 26)
    return LoadedModel("a", manifest, open_checked_engine(slot, manifest))


@pytest.fixture
def vad_model(tmp_path) -> LoadedModel:
    build_vad_onnx(tmp_path / "vad.onnx", metadata={"sampling_rates": "8000,16000"})
    built = build_bundle(tmp_path / "vad.onnx", name="vad", version=1, out_dir=tmp_path / "out",
                         input_shapes={"input": (1, 512)}, input_values={"sr": 16000})
    return _load(built.path, tmp_path / "slot")


@pytest.fixture
def detector_model(tmp_path) -> LoadedModel:
    build_detector_onnx(tmp_path / "det.onnx", metadata={"character_dict": DICTIONARY})
    built = build_bundle(tmp_path / "det.onnx", name="det", version=1, out_dir=tmp_path / "out",
                         input_shapes={"x": (1, 3, 64, 96)})
    return _load(built.path, tmp_path / "slot-det")


def _client(model: LoadedModel) -> Iterator[tuple[httpx.Client, ModelHost]]:
    host = ModelHost()
    host.swap(model)
    endpoint = InferenceEndpoint(host, address=("127.0.0.1", 0)).start()
    try:
        with httpx.Client(base_url=endpoint.where, timeout=10) as client:
            yield client, host
    finally:
        endpoint.stop()
        host.close()


@pytest.fixture
def vad(vad_model) -> Iterator[tuple[httpx.Client, ModelHost]]:
    yield from _client(vad_model)


@pytest.fixture
def detector(detector_model) -> Iterator[tuple[httpx.Client, ModelHost]]:
    yield from _client(detector_model)


def _npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _vad_inputs(batch: int = 1, sr: int = 16000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"input": rng.normal(size=(batch, 512)).astype(np.float32),
            "state": rng.normal(size=(2, batch, 128)).astype(np.float32),
            "sr": np.array(sr, np.int64)}


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("accept", [NPY, NPZ, f"{NPZ};q=0.9, application/json;q=0.1"])
def test_several_outputs_asked_in_binary_come_back_as_npz(vad, accept, compressed):
    client, _ = vad
    feeds = _vad_inputs(batch=2)
    response = client.post("/v1/infer", content=_npz(compressed, **feeds),
                           headers={"Content-Type": NPZ, "Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPZ
    assert (response.headers["x-model-name"], response.headers["x-model-version"]) == ("vad", "1")
    with np.load(io.BytesIO(response.content), allow_pickle=False) as answer:
        assert sorted(answer.files) == ["output", "stateN"]
        output, state = vad_reference(feeds["input"], feeds["state"], 16000)
        np.testing.assert_allclose(answer["output"], output, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer["stateN"], state, rtol=1e-5, atol=1e-6)


def test_json_is_still_the_default_answer(vad):
    client, _ = vad
    feeds = _vad_inputs()
    for accept in (None, "*/*", "application/*", "application/json"):
        headers = {"Accept": accept} if accept else {}
        response = client.post("/v1/infer", json={"inputs": {
            "input": feeds["input"].tolist(), "state": feeds["state"].tolist(), "sr": 16000,
        }}, headers=headers)
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["outputs"]) == {"output", "stateN"}


def test_a_single_output_model_still_answers_npy(detector):
    client, _ = detector
    x = np.random.default_rng(5).random((1, 3, 64, 32), np.float32)
    response = client.post("/v1/infer", content=_npz(x=x),
                           headers={"Content-Type": NPZ, "Accept": NPY})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY
    np.testing.assert_allclose(np.load(io.BytesIO(response.content)), detector_reference(x),
                               rtol=1e-5)


@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        (None, "json"), ("*/*", "json"), (f"{NPY}, */*", "npy"), (f"*/*;q=0.5, {NPZ}", "npz"),
        (f"application/json, {NPZ}", "json"), (f"{NPZ};q=0.9, application/json;q=0.1", "npz"),
        (f"application/*;q=0.2, {NPY};q=0.1", "json"), ("text/html", None),
        (f"{NPY};q=0", None), (f"{NPY};q=abc", None),
    ],
)
def test_the_answer_format_follows_accept_and_its_weights(accept, answer):
    assert _answer_format(accept.encode() if accept else None) == answer


@pytest.mark.parametrize("accept", ["text/html", "image/png", f"{NPY};q=0, application/xml"])
def test_an_answer_no_format_can_give_is_406_before_the_model_runs(vad, accept):
    client, host = vad
    before = host.stats.snapshot()
    response = client.post("/v1/infer", content=_npz(**_vad_inputs()),
                           headers={"Content-Type": NPZ, "Accept": accept})
    assert response.status_code == 406
    assert NPZ in response.json()["error"] and "application/json" in response.json()["error"]
    after = host.stats.snapshot()
    assert after["inference_count"] == before["inference_count"]
    assert after["client_error_count"] == before["client_error_count"] + 1


def test_a_sample_rate_the_model_refuses_is_the_callers_422(vad):
    client, host = vad
    before = host.stats.snapshot()
    response = client.post("/v1/infer", content=_npz(**_vad_inputs(sr=44100)),
                           headers={"Content-Type": NPZ})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "the model refused this input" in error and "Gather" in error
    assert "onnxruntime_src" not in error and "\n" not in error
    after = host.stats.snapshot()
    assert after["client_error_count"] == before["client_error_count"] + 1
    assert after["error_count"] == before["error_count"] == 0
    # and the model keeps answering the rates it takes
    good = client.post("/v1/infer", content=_npz(**_vad_inputs(sr=8000)),
                       headers={"Content-Type": NPZ, "Accept": NPZ})
    assert good.status_code == 200, good.text


def test_a_state_whose_batch_disagrees_with_the_audio_is_a_422(vad):
    client, host = vad
    feeds = _vad_inputs(batch=2)
    feeds["state"] = np.zeros((2, 3, 128), np.float32)
    response = client.post("/v1/infer", content=_npz(**feeds), headers={"Content-Type": NPZ})
    assert response.status_code == 422, response.text
    assert "broadcast" in response.json()["error"]
    assert host.stats.snapshot()["error_count"] == 0


@pytest.mark.parametrize(("height", "width"), [(50, 64), (64, 33), (1, 1)])
def test_a_size_the_detector_cannot_take_is_a_422(detector, height, width):
    client, host = detector
    x = np.zeros((1, 3, height, width), np.float32)
    response = client.post("/v1/infer", content=_npz(x=x), headers={"Content-Type": NPZ})
    assert response.status_code == 422, response.text
    assert "Reshape" in response.json()["error"]
    assert host.stats.snapshot()["error_count"] == 0
    x = np.random.default_rng(2).random((2, 3, 96, 64), np.float32)
    ok = client.post("/v1/infer", content=_npz(x=x), headers={"Content-Type": NPZ})
    assert ok.status_code == 200
    np.testing.assert_allclose(ok.json()["outputs"]["maps"], detector_reference(x), rtol=1e-5)


def test_the_same_failure_before_the_model_ever_answered_is_the_models(tmp_path):
    """Nothing shows the model works until it has answered once: a failure then is not
    blamed on the input (a bundle without samples serves such an engine)."""
    build_detector_onnx(tmp_path / "det.onnx")
    with load_engine(tmp_path / "det.onnx") as engine:
        with pytest.raises(EngineError) as refused:
            engine.infer(np.zeros((1, 3, 50, 64), np.float32))
        assert not isinstance(refused.value, RejectedInputError)
        assert "Reshape node 'stride_32_tiles'" in str(refused.value)
        engine.infer(np.zeros((1, 3, 64, 64), np.float32))
        with pytest.raises(RejectedInputError):
            engine.infer(np.zeros((1, 3, 50, 64), np.float32))


def test_model_metadata_is_in_the_manifest_and_the_model_description(detector, vad):
    detector_client, _ = detector
    described = detector_client.get("/v1/model").json()
    assert described["metadata"] == {"character_dict": DICTIONARY}
    assert described["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 3, None, None], "allow_nan": False}
    ]
    vad_client, _ = vad
    described = vad_client.get("/v1/model").json()
    assert described["metadata"] == {"sampling_rates": "8000,16000"}
    assert [i["name"] for i in described["inputs"]] == ["input", "state", "sr"]
    assert [o["name"] for o in described["outputs"]] == ["output", "stateN"]


@pytest.mark.parametrize(
    ("metadata", "said"),
    [
        ({f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}, "metadata"),
        ({"k" * (MAX_METADATA_KEY_CHARS + 1): "v"}, "metadata"),
        ({"": "v"}, "metadata"),
        ({"dict": "x" * (MAX_METADATA_VALUE_CHARS + 1)}, "metadata"),
        ({"dict": "nul\x00"}, "metadata"),
        ({"dict": 7}, "metadata"),
    ],
    ids=["keys", "key-length", "empty-key", "value-length", "control", "not-text"],
)
def test_a_manifest_with_metadata_out_of_bounds_is_refused(vad_model, metadata, said):
    manifest = json.loads(manifest_bytes(vad_model.manifest))
    assert decode(BundleManifest, json.dumps(manifest)).metadata == {
        "sampling_rates": "8000,16000"}
    manifest["metadata"] = metadata
    with pytest.raises(MessageRejected, match=said):
        decode(BundleManifest, json.dumps(manifest))


# --- agent.npy: the npz reader and writer the endpoint uses ---------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader_gives_what_numpy_wrote(compressed):
    arrays = {"a": np.arange(12, dtype=np.int64).reshape(3, 4), "b.c": np.float32(2.5),
              "ü": np.ones((2, 0), np.float16), "big": np.zeros((3, 5), ">f8"),
              "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    read = load_npz(_npz(compressed, **arrays), 1 << 20)
    assert sorted(read) == sorted(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(read[name], array)
        assert read[name].dtype == array.dtype


def test_npz_member_failing_its_crc_is_refused():
    body = bytearray(_npz(x=np.arange(64, dtype=np.float32)))
    body[body.index(b"\x93NUMPY") + 200] ^= 0xFF  # a data byte of the stored member
    with pytest.raises(NpyError, match="CRC"):
        load_npz(bytes(body), 1 << 20)


def test_npz_declaring_more_than_the_limit_is_refused_before_reading():
    with pytest.raises(NpyError, match="over the 100-byte limit"):
        load_npz(_npz(x=np.zeros(64, np.float32)), 100)


def test_npz_answers_are_zip_files_numpy_and_zipfile_read():
    arrays = {"output": np.float32([[0.25]]), "stateN": np.ones((2, 1, 4), np.float32),
              "naïve/name": np.arange(3)}
    body = dump_npz(arrays)
    assert zipfile.ZipFile(io.BytesIO(body)).testzip() is None
    with np.load(io.BytesIO(body), allow_pickle=False) as read:
        assert sorted(read.files) == sorted(arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(read[name], array)
    assert sorted(load_npz(body, 1 << 20)) == sorted(arrays)


def test_a_shape_a_tflite_model_cannot_prepare_is_refused_once_it_has_answered(tmp_path):
    """TFLite checks shapes when it allocates (each op's Prepare): after one answer, a
    failure there is the new shape's; before any, the model's."""
    pytest.importorskip("ai_edge_litert")
    _reshape_tflite(tmp_path / "reshape.tflite")
    with load_engine(tmp_path / "reshape.tflite") as fresh:
        with pytest.raises(EngineError) as failed:
            fresh.infer(np.zeros((2, 8), np.float32))
        assert not isinstance(failed.value, RejectedInputError)
    with load_engine(tmp_path / "reshape.tflite") as engine:
        assert engine.infer(np.arange(8, dtype=np.float32)[None])["y"].shape == (2, 4)
        with pytest.raises(RejectedInputError) as refused:
            engine.infer(np.zeros((2, 8), np.float32))
        assert refused.value.input == "x" and "\n" not in str(refused.value)
        assert engine.infer(np.ones((1, 8), np.float32))["y"].shape == (2, 4)  # and recovers


def _reshape_tflite(path: Path) -> None:
    """x float32 [batch, 8] (batch dynamic) -> RESHAPE to a fixed [2, 4]: batch 1 only."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    new_shape = schema.BufferT()
    new_shape.data = np.array([2, 4], np.int32).view(np.uint8).ravel()

    def tensor(name, shape, signature=None, kind=schema.TensorType.FLOAT32, buffer=0):
        result = schema.TensorT()
        result.name, result.type, result.shape, result.buffer = name, kind, shape, buffer
        result.shapeSignature, result.hasRank = signature, True
        return result

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RESHAPE
    code.version = 1
    operator = schema.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, [0, 1], [2]
    operator.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    operator.builtinOptions = schema.ReshapeOptionsT()
    operator.builtinOptions.newShape = [2, 4]
    subgraph = schema.SubGraphT()
    subgraph.name = "reshape"
    subgraph.tensors = [tensor("x", [1, 8], [-1, 8]),
                        tensor("new_shape", [2], kind=schema.TensorType.INT32, buffer=1),
                        tensor("y", [2, 4])]
    subgraph.inputs, subgraph.outputs, subgraph.operators = [0], [2], [operator]
    model = schema.ModelT()
    model.version, model.description = 3, "edgefleet-tests"
    model.operatorCodes, model.subgraphs = [code], [subgraph]
    model.buffers = [schema.BufferT(), new_shape]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def test_a_scalar_input_stays_a_scalar_when_prepared_again(vad_model):
    """Prepared inputs are what the engine runs (and what drift summarises): preparing
    them again must give the same shapes, a 0-d ``sr`` included."""
    from agent.runtime.engine import prepare_inputs

    specs = vad_model.engine.inputs
    first = prepare_inputs(specs, {"input": np.zeros((1, 512), np.float32),
                                   "state": np.zeros((2, 1, 128), np.float32), "sr": 16000})
    assert first["sr"].shape == ()
    again = prepare_inputs(specs, first)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in first.items()}
