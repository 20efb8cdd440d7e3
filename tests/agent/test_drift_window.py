"""Drift windows on the device: real bundles built by the fleet's builder, unpacked as the
agent does, run by onnxruntime; requests observed, windows closed by rows, by time (an
injected clock, no sleeps) and by a model change."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import extract_bundle
from agent.contract import (
    HISTOGRAM_MISSING,
    HISTOGRAM_OVERFLOW,
    HISTOGRAM_UNDERFLOW,
    MAX_DRIFT_FEATURES,
    Baseline,
    BaselineHistogram,
    BundleManifest,
    FileEntry,
    SummarySpec,
    TensorSchema,
    decode,
    encode,
    utcnow,
)
from agent.drift import DriftPlan, DriftWindow, live_counts, load_drift_plan, plan_drift
from agent.drift.summaries import summarise
from agent.runtime import Engine, load_engine
from fleet.bundle_build import build_bundle
from tests.fixtures.drift_models import build_conv_onnx
from tests.fixtures.models import build_mlp_onnx

LIMIT = 50 * 1024 * 1024


class FakeClock:
    """Monotonic seconds and wall time that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.epoch = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self.epoch + timedelta(seconds=self.now - 1000.0)


def _installed(work: Path, model: Path, baseline: Path, version: int = 1
               ) -> tuple[DriftPlan, Engine]:
    built = build_bundle(model, name=model.stem, version=version, out_dir=work / "out",
                         baseline=baseline)
    slot = work / f"slot-{model.stem}-{version}"
    manifest = extract_bundle(built.path, slot, LIMIT)
    plan = load_drift_plan(slot, manifest)
    assert plan is not None and plan.skipped == ()
    return plan, load_engine(slot / manifest.model_file)


@pytest.fixture(scope="module")
def conv(tmp_path_factory) -> tuple[DriftPlan, Engine]:
    work = tmp_path_factory.mktemp("conv")
    build_conv_onnx(work / "conv.onnx")
    images = np.random.default_rng(0).uniform(0, 1, (48, 3, 16, 16)).astype(np.float32)
    np.save(work / "images.npy", images)
    plan, engine = _installed(work, work / "conv.onnx", work / "images.npy")
    yield plan, engine
    engine.close()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[DriftPlan, Engine, DriftPlan]:
    """The tabular model as two bundle versions (for a model change)."""
    work = tmp_path_factory.mktemp("mlp")
    build_mlp_onnx(work / "mlp.onnx")
    np.save(work / "train.npy", np.random.default_rng(1).normal(size=(400, 4)))
    plan, engine = _installed(work, work / "mlp.onnx", work / "train.npy", version=1)
    second, other = _installed(work, work / "mlp.onnx", work / "train.npy", version=2)
    other.close()
    yield plan, engine, second
    engine.close()


def _reference(plan: DriftPlan, inputs: dict, outputs: dict) -> dict[str, list[int]]:
    """Counts straight from the rule: every row's summaries on the baseline's edges."""
    expected = {}
    for tensor in plan.tensors:
        source = outputs if tensor.is_output else inputs
        features = summarise(tensor.spec, source[tensor.name])
        for name, edges, values in zip(tensor.features, tensor.edges, features, strict=True):
            expected[name] = live_counts(edges, values).tolist()
    return expected


def _counts(report) -> dict[str, list[int]]:
    return {f.feature: f.counts for f in report.features}


def test_window_counts_are_the_rule_applied_to_every_summary_of_every_row(conv):
    plan, engine = conv
    clock = FakeClock()
    window = DriftWindow(plan, sample_rate=None, clock=clock, wall=clock.wall)
    rng = np.random.default_rng(5)
    # 16x16 images are blocked (small rows), 64x64 ones binned as they come (large rows);
    # the model takes both (its height and width are dynamic).
    batches = [rng.uniform(0, 1, (n, 3, size, size)).astype(np.float32)
               for n, size in ((7, 16), (1, 16), (5, 64), (30, 16), (2, 64))]
    for images in batches:
        window.observe({"image": images}, engine.infer(images))
    (report,) = window.close()
    assert (report.rows, report.binned, report.reason) == (45, 45, "close")
    assert report.model.name == "conv" and report.model.version == 1
    assert [f.feature for f in report.features] == list(plan.features)
    expected = {name: np.zeros(len(edges) + 2, np.int64)
                for t in plan.tensors for name, edges in zip(t.features, t.edges, strict=True)}
    for images in batches:
        for name, counts in _reference(plan, {"image": images},
                                       engine.infer(images)).items():
            expected[name] += counts
    assert _counts(report) == {name: counts.tolist() for name, counts in expected.items()}
    assert all(sum(f.counts) == 45 for f in report.features)
    assert "image:ch2.p90" in _counts(report) and "output:probs.class" in _counts(report)


def test_values_outside_the_baseline_go_to_underflow_overflow_and_missing(mlp):
    plan, _, _ = mlp
    window = DriftWindow(plan, sample_rate=None)
    low, high = plan.tensors[0].edges[0][0], plan.tensors[0].edges[0][-1]
    x = np.zeros((5, 4), np.float32)
    x[:, 0] = [low - 1, high + 1, high, np.nan, np.inf]
    window.observe({"x": x}, {"y": np.zeros((5, 3), np.float32)})
    (report,) = window.close()
    first = _counts(report)["x[0]"]
    assert first[HISTOGRAM_UNDERFLOW] == 1 and first[HISTOGRAM_OVERFLOW] == 1
    assert first[HISTOGRAM_MISSING] == 2
    assert first[HISTOGRAM_OVERFLOW - 1] == 1  # the last edge is inside the last bin
    assert _counts(report)["output:y.class"][1] == 5  # class 0, five times


def test_a_window_closes_once_it_holds_max_rows(mlp):
    plan, engine, _ = mlp
    window = DriftWindow(plan, max_rows=100, sample_rate=None)
    x = np.random.default_rng(2).normal(size=(40, 4)).astype(np.float32)
    for _ in range(3):
        window.observe({"x": x}, engine.infer(x))
    (report,) = window.poll()
    assert (report.rows, report.reason) == (120, "rows")
    window.observe({"x": x}, engine.infer(x))
    assert window.poll() == []
    (rest,) = window.close()
    assert rest.rows == 40 and all(sum(f.counts) == 40 for f in rest.features)


def test_a_window_closes_on_time_and_an_empty_one_says_nothing(mlp):
    plan, engine, _ = mlp
    clock = FakeClock()
    window = DriftWindow(plan, window_s=300, clock=clock, wall=clock.wall)
    x = np.ones((2, 4), np.float32)
    window.observe({"x": x}, engine.infer(x))
    clock.now += 299
    assert window.poll() == []
    clock.now += 2
    (report,) = window.poll()
    assert report.reason == "time" and report.rows == 2
    assert report.started_at == clock.epoch
    assert report.ended_at == clock.epoch + timedelta(seconds=301)
    clock.now += 1000  # nothing served: no report
    assert window.poll() == []
    window.observe({"x": x}, engine.infer(x))  # the window that closed at 1301 is empty,
    clock.now += 300  # this one starts with the request that came after it
    window.observe({"x": x}, engine.infer(x))  # and this one closes it on arrival
    assert [r.rows for r in window.poll()] == [2]


def test_a_model_change_closes_the_old_window_and_counts_only_the_new_model(mlp):
    plan, engine, second = mlp
    window = DriftWindow(plan, sample_rate=None)
    x = np.ones((3, 4), np.float32)
    window.observe({"x": x}, engine.infer(x))
    window.reset(second)
    window.observe({"x": x[:1]}, engine.infer(x[:1]))
    old, new = window.close()
    assert (old.model.version, old.rows, old.reason) == (1, 3, "reset")
    assert (new.model.version, new.rows) == (2, 1)
    assert all(sum(f.counts) == 1 for f in new.features)
    window.reset(None)  # no bundle: observing is a no-op
    window.observe({"x": x}, engine.infer(x))
    assert window.close() == [] and window.plan is None


def test_concurrent_requests_are_each_counted_once(mlp):
    plan, _, _ = mlp
    window = DriftWindow(plan, sample_rate=None)
    x = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
    y = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)

    def serve():
        for _ in range(500):
            window.observe({"x": x}, {"y": y})

    threads = [threading.Thread(target=serve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (report,) = window.close()
    assert report.rows == report.binned == 12000
    expected = _reference(plan, {"x": x}, {"y": y})
    assert _counts(report) == {k: [c * 4000 for c in v] for k, v in expected.items()}


def test_under_load_an_even_sample_of_rows_is_binned(mlp):
    plan, _, _ = mlp
    clock = FakeClock()
    window = DriftWindow(plan, sample_rate=500, window_s=60, clock=clock, wall=clock.wall,
                         rng=__import__("random").Random(0))
    # Ten sources in turn, each with its own value of x[0]: 20,000 rows a second for 5 s.
    edges = plan.tensors[0].edges[0]
    sources = np.linspace(edges[1], edges[-2], 10).astype(np.float32)
    rows = np.zeros((10, 4), np.float32)
    rows[:, 0] = sources
    for step in range(10_000):
        clock.now += 0.0005
        window.observe({"x": rows[step % 10 : step % 10 + 1]}, {})
    (report,) = window.close()
    assert report.rows == 10_000
    assert 1500 <= report.binned <= 3500  # ~500 a second, the first burst included
    counts = np.array(_counts(report)["x[0]"])
    assert counts.sum() == report.binned
    # Each source's share of the sample is its share of the rows (a tenth), none aliased
    # away as a fixed stride of 10 rows (or 40) would do.
    share = live_counts(edges, sources) / len(sources)
    np.testing.assert_allclose(counts[share > 0], report.binned * share[share > 0], rtol=0.2)
    # The outputs were not given: every sampled row counts as missing for them.
    assert _counts(report)["output:y.max"][HISTOGRAM_MISSING] == report.binned


def test_under_load_with_batches_every_binned_row_is_a_distinct_row(mlp, monkeypatch):
    """Sampled batches keep rows ``stride`` apart; the row after a batch's last kept one
    must never point back into that batch (it once made the next batch's last row be
    binned a dozen times, which doubled the sampling noise of every statistic)."""
    plan, _, _ = mlp
    clock = FakeClock()
    window = DriftWindow(plan, sample_rate=250, window_s=12, clock=clock, wall=clock.wall,
                         rng=__import__("random").Random(3))
    binned: list[np.ndarray] = []
    from agent.drift import window as window_module

    count = window_module._Track.count

    def recording(track, rows):  # the rows summarised and binned, as the window hands them
        if track.name == "x":
            binned.append(rows[:, 0].copy())
        return count(track, rows)

    monkeypatch.setattr(window_module._Track, "count", recording)
    start = 0
    for _ in range(300):  # 400 rows a second in batches of 20, for 15 s
        clock.now += 0.05
        rows = np.zeros((20, 4), np.float32)
        rows[:, 0] = np.arange(start, start + 20)
        start += 20
        window.observe({"x": rows}, {})
    reports = window.close()
    values = np.concatenate(binned)
    assert sum(r.binned for r in reports) == len(values)
    assert len(np.unique(values)) == len(values), "a row was binned more than once"
    assert 2000 <= len(values) <= 4500  # ~250 a second, the first burst included


def test_rows_that_do_not_fit_their_summary_count_as_missing(mlp):
    plan, _, _ = mlp
    window = DriftWindow(plan, sample_rate=None)
    x = np.ones((2, 4), np.float32)
    window.observe({"x": x}, {"y": np.zeros((2, 5), np.float32)})  # 5 scores, not 3
    (report,) = window.close()
    assert _counts(report)["output:y.class"][HISTOGRAM_MISSING] == 2
    assert sum(_counts(report)["x[1]"][:-1]) == 2


def _wide_plan(columns: int) -> DriftPlan:
    edges = [float(e) for e in np.linspace(-3, 3, 21)]
    features = [BaselineHistogram(feature=f"x[{i}]", edges=edges, counts=[1] * 20)
                for i in range(columns)]
    manifest = BundleManifest(
        name="wide", version=3, runtime="onnx", model_file="model.onnx",
        inputs=[TensorSchema(name="x", dtype="float32", shape=[None, columns])],
        outputs=[TensorSchema(name="y", dtype="float32", shape=[None, 1])],
        files={"model.onnx": FileEntry(sha256="0" * 64, size=1)}, created=utcnow(),
    )
    baseline = Baseline(rows=20, features=features, summaries=[
        SummarySpec(tensor="x", role="input", kind="values", columns=columns)])
    return plan_drift(manifest, baseline)


def test_a_wide_window_is_split_into_messages_within_the_contract_bounds():
    plan = _wide_plan(600)
    window = DriftWindow(plan, sample_rate=None)
    x = np.random.default_rng(6).normal(size=(2000, 600)).astype(np.float32)
    window.observe({"x": x}, {})
    (report,) = window.close()
    seqs = iter(range(10, 100))
    messages = report.messages("dev-1", lambda: next(seqs))
    assert len(messages) == 3
    assert [m.seq for m in messages] == [10, 11, 12]
    assert all(len(m.features) <= MAX_DRIFT_FEATURES for m in messages)
    assert [f for m in messages for f in m.features] == list(report.features)
    for message in messages:
        decoded = decode(type(message), encode(message))  # encode refuses what ingest would
        assert decoded.rows == 2000 and decoded.window_started_at == report.started_at


def test_a_baseline_from_before_summaries_is_tracked_as_the_input_columns(tmp_path):
    """The shape ``baseline.json`` had before summaries: no ``summaries`` key."""
    old = {"rows": 3, "features": [
        {"feature": f"x[{i}]", "edges": [-1.0, 0.0, 1.0], "counts": [1, 2]} for i in range(4)]}
    baseline = decode(Baseline, json.dumps(old))
    assert baseline.summaries == []
    manifest = BundleManifest(
        name="old", version=1, runtime="onnx", model_file="model.onnx",
        inputs=[TensorSchema(name="x", dtype="float32", shape=[None, 4])],
        outputs=[TensorSchema(name="y", dtype="float32", shape=[None, 3])],
        files={"model.onnx": FileEntry(sha256="0" * 64, size=1)}, created=utcnow(),
    )
    plan = plan_drift(manifest, baseline)
    assert plan.features == ("x[0]", "x[1]", "x[2]", "x[3]") and plan.skipped == ()
    window = DriftWindow(plan, sample_rate=None)
    window.observe({"x": np.array([[-0.5, 0.5, 2.0, np.nan]], np.float32)},
                   {"y": np.zeros((1, 3), np.float32)})
    (report,) = window.close()
    assert _counts(report) == {"x[0]": [0, 1, 0, 0, 0], "x[1]": [0, 0, 1, 0, 0],
                               "x[2]": [0, 0, 0, 1, 0], "x[3]": [0, 0, 0, 0, 1]}


def test_summaries_the_bundle_cannot_use_are_skipped_and_said():
    plan = _wide_plan(4)
    manifest = BundleManifest(
        name="wide", version=3, runtime="onnx", model_file="model.onnx",
        inputs=[TensorSchema(name="z", dtype="float32", shape=[None, 4])],
        outputs=[TensorSchema(name="y", dtype="float32", shape=[None, 1])],
        files={"model.onnx": FileEntry(sha256="0" * 64, size=1)}, created=utcnow(),
    )
    baseline = Baseline(rows=1, features=[], summaries=[plan.tensors[0].spec])
    skipped = plan_drift(manifest, baseline)
    assert skipped.tensors == () and "no such input" in skipped.skipped[0]
    window = DriftWindow(skipped)
    window.observe({"z": np.ones((1, 4), np.float32)}, {})
    assert window.close() == []
