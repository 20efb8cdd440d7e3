"""Per-row summaries: which summary a tensor gets, and that its features move the way the
data does (darker images move the mean, noisier ones the spread)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.contract import SummarySpec
from agent.drift.summaries import (
    SummaryError,
    feature_names,
    fixed_edges,
    summarise,
    summary_for,
)
from agent.runtime import TensorSpec


def _spec(shape, dtype="float32", name="t"):
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


@pytest.mark.parametrize(
    ("shape", "dtype", "role", "kind", "params"),
    [
        ((None, 3, None, None), "float32", "input", "image", {"channels": 3, "channel_axis": 1}),
        ((None, 224, 224, 3), "uint8", "input", "image", {"channels": 3, "channel_axis": 3}),
        ((1, 224, 224, 3), "float32", "input", "image", {"channels": 3, "channel_axis": 3}),
        ((None, 1, 28, 28), "float32", "input", "image", {"channels": 1, "channel_axis": 1}),
        ((None, 48, 64), "uint8", "input", "image", {"channels": 1}),
        ((None, 4), "float32", "input", "values", {"columns": 4}),
        ((None, 256), "int64", "input", "values", {"columns": 256}),
        ((None,), "float32", "input", "values", {"columns": 1}),
        ((None, 16000), "float32", "input", "audio", {}),
        ((None, None), "int16", "input", "audio", {}),
        ((None, None), "int64", "input", "stats", {}),  # token ids: not audio
        ((None, 10, 20), "float32", "input", "stats", {}),
        ((None, 4), "float32", "output", "classes", {"classes": 4}),
        ((None, 1), "float32", "output", "values", {"columns": 1}),
        ((None,), "int64", "output", "values", {"columns": 1}),
        ((None, 3), "int64", "output", "values", {"columns": 3}),
        ((None, 1000), "float32", "output", "scores", {}),
        ((None, 1, None, None), "float32", "output", "scores", {}),
        ((None, None), "float32", "output", "scores", {}),
    ],
)
def test_the_auto_rule_chooses_by_shape_and_dtype(shape, dtype, role, kind, params):
    spec = summary_for(_spec(shape, dtype), role)
    assert spec == SummarySpec(tensor="t", role=role, kind=kind, **params)


@pytest.mark.parametrize("shape", [(), (2, None, 128), (8, 4)])
def test_tensors_without_a_batch_axis_are_not_summarised(shape):
    assert summary_for(_spec(shape), "input") is None
    with pytest.raises(SummaryError, match="no batch axis"):
        summary_for(_spec(shape), "input", "stats")


def test_feature_names_say_the_tensor_and_the_statistic():
    image = summary_for(_spec((None, 3, 8, 8), name="image"), "input")
    assert feature_names(image)[:6] == ("image:ch0.mean", "image:ch0.std", "image:ch0.p10",
                                        "image:ch0.p50", "image:ch0.p90", "image:ch1.mean")
    assert len(feature_names(image)) == 15
    assert feature_names(summary_for(_spec((None, 2), name="x"), "input")) == ("x[0]", "x[1]")
    assert feature_names(summary_for(_spec((None, 16000), name="a"), "input")) == (
        "a:rms", "a:zcr", "a:peak")
    label = summary_for(_spec((None, 5), name="label"), "output")
    assert feature_names(label) == ("output:label.class", "output:label.max")
    assert fixed_edges(label) == {"output:label.class": [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]}
    scores = summary_for(_spec((None, 900), name="scores"), "output")
    assert feature_names(scores) == ("output:scores.max", "output:scores.mean")


def test_an_override_that_does_not_fit_the_tensor_is_refused_by_name():
    with pytest.raises(SummaryError, match=r"input 'x'.*'values' needs a fixed"):
        summary_for(_spec((None, None), name="x"), "input", "values")
    with pytest.raises(SummaryError, match="no channel dim"):
        summary_for(_spec((None, 5, 7, 9), name="x"), "input", "image")
    with pytest.raises(SummaryError, match="layout"):
        summary_for(_spec((None, 4), name="x"), "input", "stats", "nhwc")
    assert summary_for(_spec((None, 5, 7, 9)), "input", "image", "nhwc").channel_axis == 3
    assert summary_for(_spec((None, 4)), "input", "none") is None


def _images(rng, rows=32, shift=0.0, noise=0.05):
    base = 0.5 + rng.standard_normal((rows, 3, 24, 24)) * noise
    return (base + shift).astype(np.float32)


def _by_name(spec, features):
    return dict(zip(feature_names(spec), features.mean(axis=1), strict=True))


def test_darker_images_move_the_means_and_noisier_images_move_the_spreads():
    rng = np.random.default_rng(0)
    spec = summary_for(_spec((None, 3, None, None), name="image"), "input")
    normal = _by_name(spec, summarise(spec, _images(rng)))
    darker = _by_name(spec, summarise(spec, _images(rng, shift=-0.3)))
    noisier = _by_name(spec, summarise(spec, _images(rng, noise=0.2)))
    for channel in range(3):
        mean, std, p50 = (f"image:ch{channel}.{s}" for s in ("mean", "std", "p50"))
        assert darker[mean] == pytest.approx(normal[mean] - 0.3, abs=0.01)
        assert darker[p50] == pytest.approx(normal[p50] - 0.3, abs=0.02)
        assert darker[std] == pytest.approx(normal[std], rel=0.05)
        assert noisier[std] == pytest.approx(normal[std] * 4, rel=0.05)
        assert noisier[mean] == pytest.approx(normal[mean], abs=0.01)
        p10, p90 = f"image:ch{channel}.p10", f"image:ch{channel}.p90"
        assert noisier[p90] - noisier[p10] > 3 * (normal[p90] - normal[p10])


def test_nchw_and_nhwc_layouts_give_the_same_features():
    images = _images(np.random.default_rng(1), rows=5)
    nchw = summary_for(_spec((None, 3, 24, 24)), "input")
    nhwc = summary_for(_spec((None, 24, 24, 3)), "input")
    np.testing.assert_allclose(summarise(nchw, images),
                               summarise(nhwc, images.transpose(0, 2, 3, 1)), rtol=1e-6)


def test_audio_features_of_a_sine_wave():
    rate, seconds = 16000, 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 1000 * t)])
    spec = summary_for(_spec((None, 16000)), "input")
    rms, zcr, peak = summarise(spec, tone.astype(np.float32))
    np.testing.assert_allclose(rms, [0.5 / np.sqrt(2), 0.1 / np.sqrt(2)], rtol=1e-3)
    np.testing.assert_allclose(zcr * (rate - 1), [880, 2000], atol=2)
    np.testing.assert_allclose(peak, [0.5, 0.1], rtol=1e-3)
    pcm = summary_for(_spec((None, 16000), "int16"), "input")
    np.testing.assert_allclose(summarise(pcm, (tone * 32767).astype(np.int16))[0],
                               rms * 32767, rtol=1e-3)


def test_classes_are_the_argmax_and_top_score_and_a_nan_row_has_no_class():
    spec = summary_for(_spec((None, 3)), "output")
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [np.nan, 0.5, 0.5]], np.float32)
    label, top = summarise(spec, scores)
    np.testing.assert_array_equal(label[:2], [1, 0])
    np.testing.assert_allclose(top[:2], [0.7, 0.5], rtol=1e-6)
    assert np.isnan(label[2]) and np.isnan(top[2])
    with pytest.raises(SummaryError, match="4 scores, the baseline has 3"):
        summarise(spec, np.zeros((2, 4), np.float32))


def test_summaries_are_computed_for_the_whole_batch_as_a_loop_over_rows_would():
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((50, 6, 7))
    spec = summary_for(_spec((None, 6, 7)), "input")
    assert spec.kind == "stats"
    expected = np.array([[row.mean(), row.std(), row.min(), row.max()] for row in batch]).T
    np.testing.assert_allclose(summarise(spec, batch), expected)
    scores = summary_for(_spec((None, 1, 6, 7)), "output")
    np.testing.assert_allclose(summarise(scores, batch[:, None]),
                               [[row.max() for row in batch], [row.mean() for row in batch]])


def test_values_are_a_copy_so_binning_may_sort_them_in_place():
    rows = np.arange(12, dtype=np.float64).reshape(4, 3)
    spec = summary_for(_spec((None, 3), "float64"), "input")
    features = summarise(spec, rows)
    features.sort(axis=1)
    features[:] = -1
    np.testing.assert_array_equal(rows, np.arange(12).reshape(4, 3))
