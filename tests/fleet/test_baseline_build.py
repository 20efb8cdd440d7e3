"""The drift baseline at bundle build, for any model: a conv net on images, a one-second
audio model, a model with two inputs (an NHWC image and features), a recurrent model with
inputs that are not batched; the output baseline comes from running the model."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from onnx import TensorProto, helper

from agent.contract import Baseline, decode
from fleet.baseline_build import SummaryChoice, compute_baseline, parse_summary_hints
from fleet.bundle_build import BuildError, build_bundle
from tests.fixtures.drift_models import (
    CONV_CLASSES,
    build_audio_onnx,
    build_conv_onnx,
    build_multi_input_onnx,
)
from tests.fixtures.models import _save, build_mlp_onnx, build_vad_onnx


def _member(path, name: str) -> bytes:
    with tarfile.open(path, mode="r:") as tar:
        return tar.extractfile(name).read()


def _baseline(built) -> Baseline:
    return decode(Baseline, _member(built.path, "baseline.json"))


def _features(baseline: Baseline) -> dict:
    return {h.feature: h for h in baseline.features}


def test_a_conv_net_gets_image_features_and_a_class_baseline(tmp_path):
    build_conv_onnx(tmp_path / "conv.onnx")
    images = np.random.default_rng(0).uniform(0, 1, (60, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    built = build_bundle(tmp_path / "conv.onnx", name="conv", version=1, out_dir=tmp_path,
                         baseline=tmp_path / "images.npy")
    baseline = _baseline(built)
    assert baseline.rows == 60 and built.warnings == ()
    assert [(s.tensor, s.role, s.kind, s.channels, s.channel_axis)
            for s in baseline.summaries] == [("image", "input", "image", 3, 1),
                                             ("probs", "output", "classes", None, None)]
    features = _features(baseline)
    assert len(features) == 3 * 5 + 2
    assert all(sum(h.counts) == 60 for h in features.values())
    mean = features["image:ch1.mean"]  # equal-mass bins on the training means
    assert len(mean.counts) == 20 and max(mean.counts) - min(mean.counts) <= 1
    classes = features["output:probs.class"]  # exact: one bin per class
    assert classes.edges == [c - 0.5 for c in range(CONV_CLASSES + 1)]
    assert 0 <= features["output:probs.max"].edges[0] <= features["output:probs.max"].edges[-1] <= 1
    with np.load(io.BytesIO(_member(built.path, "samples.npz"))) as samples:
        np.testing.assert_array_equal(samples["input:image"], images[:8])  # baseline rows


def test_a_model_with_two_inputs_takes_an_npz_and_records_its_outputs(tmp_path):
    build_multi_input_onnx(tmp_path / "multi.onnx")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    x = rng.normal(size=(40, 4))  # float64: run as the model's float32
    np.savez(tmp_path / "train.npz", image=image, x=x)
    built = build_bundle(tmp_path / "multi.onnx", name="multi", version=2, out_dir=tmp_path,
                         baseline=tmp_path / "train.npz")
    baseline = _baseline(built)
    kinds = {(s.tensor, s.kind) for s in baseline.summaries}
    assert kinds == {("image", "image"), ("x", "values"), ("logits", "classes"),
                     ("heat", "scores")}
    assert next(s for s in baseline.summaries if s.tensor == "image").channel_axis == 3
    features = _features(baseline)
    assert {"image:ch2.p50", "x[3]", "output:logits.class", "output:logits.max",
            "output:heat.max", "output:heat.mean"} <= set(features)
    np.testing.assert_allclose(features["x[0]"].edges[0], x[:, 0].astype(np.float32).min())
    with np.load(io.BytesIO(_member(built.path, "samples.npz"))) as samples:
        assert samples["input:image"].shape == (8, 8, 8, 3)
        np.testing.assert_allclose(samples["input:x"], x[:8].astype(np.float32))


def test_one_second_of_audio_gets_audio_features(tmp_path):
    build_audio_onnx(tmp_path / "audio.onnx")
    rng = np.random.default_rng(2)
    np.save(tmp_path / "audio.npy", (rng.standard_normal((30, 16000)) * 0.1).astype(np.float32))
    baseline = _baseline(build_bundle(tmp_path / "audio.onnx", name="kws", version=1,
                                      out_dir=tmp_path, baseline=tmp_path / "audio.npy"))
    assert [h.feature for h in baseline.features] == [
        "audio:rms", "audio:zcr", "audio:peak", "output:score[0]"]
    rms = _features(baseline)["audio:rms"]
    assert 0.09 < rms.edges[0] < rms.edges[-1] < 0.11


def test_inputs_without_a_batch_axis_are_passed_as_given(tmp_path):
    """A recurrent model: its state is given for one row, so it runs one row at a time."""
    build_vad_onnx(tmp_path / "vad.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "train.npz", input=rng.normal(size=(25, 512)).astype(np.float32),
             state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000))
    built = build_bundle(tmp_path / "vad.onnx", name="vad", version=1, out_dir=tmp_path,
                         baseline=tmp_path / "train.npz")
    baseline = _baseline(built)
    assert baseline.rows == 25
    assert [s.tensor for s in baseline.summaries] == ["input", "output"]  # not state, sr
    assert [h.feature for h in baseline.features][-1] == "output:output[0]"


def test_integer_labels_get_one_bin_per_value(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)], "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])])
    _save(graph, tmp_path / "argmax.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(4).normal(size=(200, 5)))
    features = _features(_baseline(build_bundle(
        tmp_path / "argmax.onnx", name="argmax", version=1, out_dir=tmp_path,
        baseline=tmp_path / "x.npy")))
    label = features["output:label[0]"]
    assert label.edges == [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5] and sum(label.counts) == 200


def test_summaries_can_be_chosen_per_tensor(tmp_path, onnx_mlp):
    np.save(tmp_path / "x.npy", np.random.default_rng(5).normal(size=(50, 4)))
    built = build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                         baseline=tmp_path / "x.npy", summaries={"x": "stats", "y": "none"})
    assert [h.feature for h in _baseline(built).features] == [
        "x:mean", "x:std", "x:min", "x:max"]
    assert parse_summary_hints(["img=image:nhwc", "y=scores"]) == {
        "img": SummaryChoice("image", "nhwc"), "y": SummaryChoice("scores")}
    for bad in ("img", "img=picture", "x=stats:nhwc", "img=image:hwc"):
        with pytest.raises(BuildError, match="--summary"):
            parse_summary_hints([bad])
    with pytest.raises(BuildError, match="no tensor z"):
        build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                     baseline=tmp_path / "x.npy", summaries={"z": "stats"})
    with pytest.raises(BuildError, match=r"input 'x' of shape .*: an image needs"):
        build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                     baseline=tmp_path / "x.npy", summaries={"x": "image"})
    with pytest.raises(BuildError, match="give a --baseline too"):
        build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                     summaries={"x": "stats"})


def test_large_baselines_are_bounded_and_the_rows_used_are_said(tmp_path):
    build_mlp_onnx(tmp_path / "m.onnx")
    from agent.runtime import load_engine

    rows = np.random.default_rng(6).normal(size=(1000, 4)).astype(np.float32)
    with load_engine(tmp_path / "m.onnx") as engine:
        result = compute_baseline(engine, {"x": rows}, max_rows=100)
        assert result.baseline.rows == 100
        assert "1000 rows given, 100 used (evenly spaced" in result.warnings[0]
        by_bytes = compute_baseline(engine, {"x": rows}, max_bytes=16 * 50)
        assert by_bytes.baseline.rows == 50


@pytest.mark.parametrize(
    ("files", "model", "message"),
    [
        ({"train.npy": np.zeros((10, 4))}, "multi",
         "a model with 2 inputs needs an .npz keyed by input name (image, x)"),
        ({"train.npz": {"x": np.zeros((10, 4), np.float32)}}, "multi",
         "no data for input 'image'"),
        ({"train.npz": {"x": np.zeros((10, 4)), "image": np.zeros((9, 8, 8, 3), np.uint8)}},
         "multi", "inputs disagree on rows"),
        ({"train.npz": {"x": np.zeros((10, 4)), "extra": np.zeros(3)}}, "mlp",
         "no model input named extra"),
        ({"train.npy": np.full((10, 4), np.nan)}, "mlp", "values must be finite numbers"),
        ({"train.npy": np.zeros((10, 5))}, "mlp", "expected shape (rows, 4), given (10, 5)"),
        ({"train.npy": np.array([["a"] * 4] * 3)}, "mlp", "values must be finite numbers"),
        ({"train.txt": "1,2,3,4"}, "mlp", "expected an .npy or .npz file"),
    ],
)
def test_baselines_that_cannot_be_used_are_refused_in_one_line(tmp_path, files, model, message):
    (build_multi_input_onnx if model == "multi" else build_mlp_onnx)(tmp_path / "m.onnx")
    ((name, content),) = files.items()
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content)
    elif name.endswith(".npz"):
        np.savez(path, **content)
    else:
        path.write_text(content)
    with pytest.raises(BuildError) as caught:
        build_bundle(tmp_path / "m.onnx", name="m", version=1, out_dir=tmp_path / "out",
                     baseline=path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_of_images_gives_the_baseline_of_the_same_images_stacked(tmp_path):
    build_conv_onnx(tmp_path / "conv.onnx")
    images = np.random.default_rng(4).uniform(0, 1, (40, 3, 8, 8)).astype(np.float32)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images[:30]):  # one image a file...
        np.save(folder / f"img-{index:03d}.npy", image)
    np.save(folder / "img-999.npy", images[30:])  # ... and a batch
    np.save(tmp_path / "stacked.npy", images)
    from_folder = build_bundle(tmp_path / "conv.onnx", name="a", version=1,
                               out_dir=tmp_path / "a", baseline=folder)
    from_array = build_bundle(tmp_path / "conv.onnx", name="b", version=1,
                              out_dir=tmp_path / "b", baseline=tmp_path / "stacked.npy")
    assert json.loads(_member(from_folder.path, "baseline.json")) == json.loads(
        _member(from_array.path, "baseline.json"))


@pytest.mark.parametrize(("files", "message"), [
    ({}, "an empty folder"),
    ({"cat.png": b"\x89PNG"}, "only .npy files are read from a folder, not cat.png"),
    ({"a.npy": np.zeros((3, 8, 8), np.float32), "b.npy": np.zeros((2, 3, 9, 9), np.float32)},
     "does not stack"),
])
def test_a_folder_the_build_cannot_read_is_refused_with_what_to_do(tmp_path, files, message):
    build_conv_onnx(tmp_path / "conv.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            np.save(folder / name, content)
    with pytest.raises(BuildError, match=re.escape(message)):
        build_bundle(tmp_path / "conv.onnx", name="m", version=1, out_dir=tmp_path,
                     baseline=folder)


def test_a_folder_for_a_model_of_several_inputs_is_refused(tmp_path, onnx_mlp):
    build_multi_input_onnx(tmp_path / "multi.onnx")
    (tmp_path / "images").mkdir()
    with pytest.raises(BuildError, match="one-input model"):
        build_bundle(tmp_path / "multi.onnx", name="m", version=1, out_dir=tmp_path,
                     baseline=tmp_path / "images")


def test_the_baseline_json_is_what_the_contract_reads(tmp_path, onnx_mlp):
    np.save(tmp_path / "x.npy", np.random.default_rng(7).normal(size=(30, 4)))
    built = build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                         baseline=tmp_path / "x.npy")
    document = json.loads(_member(built.path, "baseline.json"))
    assert set(document) == {"rows", "features", "summaries"}
    assert document["summaries"] == [
        {"tensor": "x", "role": "input", "kind": "values", "columns": 4},
        {"tensor": "y", "role": "output", "kind": "classes", "classes": 3}]


def test_the_builder_s_drift_thresholds_travel_in_the_baseline_and_bad_ones_are_refused(
    tmp_path, onnx_mlp
):
    np.save(tmp_path / "x.npy", np.random.default_rng(7).normal(size=(30, 4)))
    built = build_bundle(onnx_mlp.path, name="mlp", version=1, out_dir=tmp_path,
                         baseline=tmp_path / "x.npy", drift_thresholds={"psi": 0.3, "js": 0.15})
    baseline = decode(Baseline, _member(built.path, "baseline.json"))
    assert baseline.thresholds is not None
    assert (baseline.thresholds.psi, baseline.thresholds.js) == (0.3, 0.15)
    assert baseline.thresholds.wasserstein is None  # the fleet's default applies
    with pytest.raises(BuildError, match="drift-threshold: field 'psi'"):
        build_bundle(onnx_mlp.path, name="mlp", version=2, out_dir=tmp_path,
                     baseline=tmp_path / "x.npy", drift_thresholds={"psi": -1})
    with pytest.raises(BuildError, match="give a --baseline too"):
        build_bundle(onnx_mlp.path, name="mlp", version=2, out_dir=tmp_path,
                     drift_thresholds={"psi": 0.3})
