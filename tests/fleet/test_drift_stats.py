"""Drift statistics: the acceptance of issue 14 on synthetic data, and agreement with scipy.

The baseline is what ``edge-fleet bundle build`` makes: 20 quantile bins of 50,000 N(0, 1)
training values, counted with ``np.histogram``. Live windows of 2,000 rows are binned here
with the agent's rule (``searchsorted(edges, x, side="right")`` into the k + 3 layout), so
these tests read the layout the way a device writes it. ``pytest -s`` shows the measured
false-alarm and detection rates.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fleet.drift import (
    MISSING,
    OVERFLOW,
    PSI_EPSILON,
    UNDERFLOW,
    AlertChange,
    AlertState,
    BadCountError,
    BadEdgesError,
    BinCountMismatchError,
    DriftConfigError,
    DriftInputError,
    DriftStats,
    DriftThresholds,
    EmptyBaselineError,
    Reduction,
    ScorePolicy,
    Statistic,
    TooManyBinsError,
    baseline_layout,
    baseline_scale,
    bin_positions,
    crossed,
    device_score,
    drift_stats,
    feature_severity,
    js_distance,
    missing_delta,
    psi,
    step_alerts,
    wasserstein,
)
from fleet.errors import FleetError


def _scipy():
    """scipy is a test-only reference. Without it these comparisons skip locally and fail
    under CI=true, so CI never goes green without having compared."""
    try:
        import scipy.spatial.distance
        import scipy.stats
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("scipy is needed for the drift reference comparisons (dev extra)")
        pytest.skip("scipy is not installed")
    return scipy


BINS = 20
FEATURES = 8
ROWS = 2_000
TRAINING_ROWS = 50_000


def bin_like_the_agent(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The agent's rule: k + 3 counts per window of ``values`` (last axis = rows)."""
    k = len(edges) - 1
    missing = np.isnan(values)
    index = np.searchsorted(edges, np.where(missing, 0.0, values), side="right")
    index = np.where(values == edges[-1], k, index)  # the right edge is in the last bin
    index = np.where(missing, k + 2, index)
    flat = index.reshape(-1, values.shape[-1])
    offsets = np.arange(flat.shape[0])[:, None] * (k + 3)
    counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * (k + 3))
    return counts.reshape(*values.shape[:-1], k + 3).astype(np.float64)


@pytest.fixture(scope="module")
def baseline() -> tuple[np.ndarray, np.ndarray]:
    """(layout counts (features, k + 3), edges (features, k + 1)) as the bundle build does."""
    rng = np.random.default_rng(14)
    training = rng.standard_normal((TRAINING_ROWS, FEATURES))
    edges = np.stack([np.quantile(training[:, f], np.linspace(0, 1, BINS + 1))
                      for f in range(FEATURES)])
    counts = np.stack([np.histogram(training[:, f], bins=edges[f])[0]
                       for f in range(FEATURES)])
    return baseline_layout(counts), edges


def live_windows(baseline, rng, windows: int, drift=None, feature: int = 0) -> np.ndarray:
    """(windows, features, k + 3) live counts of N(0, 1) rows, ``drift`` applied to one
    feature's values."""
    _, edges = baseline
    values = rng.standard_normal((windows, FEATURES, ROWS))
    if drift is not None:
        values[:, feature] = drift(values[:, feature], rng)
    return np.stack([bin_like_the_agent(values[:, f], edges[f]) for f in range(FEATURES)],
                    axis=1)


# --- the layout --------------------------------------------------------------------------


def test_agent_binning_matches_np_histogram_inside_the_range_and_fills_the_extra_columns():
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    values = np.array([-1.0, 0.0, 0.5, 1.0, 3.9, 4.0, 4.5, np.nan, np.nan])
    counts = bin_like_the_agent(values, edges)
    inside = values[(values >= 0) & (values <= 4)]
    assert counts[UNDERFLOW] == 1 and counts[OVERFLOW] == 1 and counts[MISSING] == 2
    np.testing.assert_array_equal(counts[1:OVERFLOW], np.histogram(inside, bins=edges)[0])


def test_baseline_layout_pads_underflow_overflow_and_missing_with_zeros():
    np.testing.assert_array_equal(baseline_layout([3, 4]), [0, 3, 4, 0, 0])
    assert baseline_layout(np.ones((5, 2, 7))).shape == (5, 2, 10)


def test_bin_positions_are_midpoints_with_outer_columns_one_half_bin_beyond_the_edges():
    np.testing.assert_allclose(bin_positions([0.0, 1.0, 3.0]), [-0.5, 0.5, 2.0, 4.0])


def test_baseline_scale_is_the_standard_deviation_of_normal_training_data(baseline):
    counts, edges = baseline
    np.testing.assert_allclose(baseline_scale(counts, edges), 1.0, atol=0.03)
    # in feature units: a feature measured in millimetres instead of metres
    np.testing.assert_allclose(baseline_scale(counts, edges * 1000),
                               baseline_scale(counts, edges) * 1000)


# --- acceptance: false alarms and detection ----------------------------------------------


def test_unshifted_devices_stay_below_threshold_in_99_percent_of_windows(baseline):
    counts, edges = baseline
    windows = 500
    stats = drift_stats(counts, live_windows(baseline, np.random.default_rng(1), windows),
                        edges)
    severity = feature_severity(stats)
    device_alarms = crossed(device_score(stats, [f"x{f}" for f in range(FEATURES)]), 1.0)
    per_statistic = {s.value: float(crossed(stats.of(s), DriftThresholds().of(s)).mean())
                     for s in DriftStats.MEASURED}
    print(f"\nN(0,1), {windows} windows of {ROWS} rows x {FEATURES} features: "
          f"device false-alarm rate {device_alarms.mean():.4f} (any feature, any statistic), "
          f"per feature {crossed(severity, 1.0).mean():.5f}; per statistic {per_statistic}")
    assert device_alarms.mean() <= 0.01
    assert all(rate <= 0.01 for rate in per_statistic.values())


def _shift(values, rng):
    return values + 0.5


def _scale(values, rng):
    return values * 2


def _twenty_percent_missing(values, rng):
    return np.where(rng.random(values.shape) < 0.2, np.nan, values)


@pytest.mark.parametrize(("drift", "detected_by"), [
    (_shift, {Statistic.PSI, Statistic.JS, Statistic.WASSERSTEIN}),
    (_scale, {Statistic.PSI, Statistic.JS, Statistic.WASSERSTEIN}),
    (_twenty_percent_missing, {Statistic.PSI, Statistic.JS, Statistic.MISSING}),
], ids=["mean+0.5", "scale x2", "20% NaN"])
def test_a_drifted_feature_crosses_within_two_windows(baseline, drift, detected_by):
    counts, edges = baseline
    devices, drifted = 100, 3
    live = live_windows(baseline, np.random.default_rng(2), devices * 2, drift, drifted)
    stats = drift_stats(counts, live.reshape(devices, 2, FEATURES, -1), edges)
    first, either = {}, {}
    for statistic in DriftStats.MEASURED:
        hit = crossed(stats.of(statistic)[..., drifted], DriftThresholds().of(statistic))
        first[statistic.value] = float(hit[:, 0].mean())
        either[statistic.value] = float(hit.any(axis=1).mean())
    scores = device_score(stats, [f"x{f}" for f in range(FEATURES)])
    print(f"\n{drift.__name__}: detection in the first window {first}, "
          f"within two windows {either}")
    assert crossed(scores, 1.0).any(axis=1).all()  # every device, within two windows
    assert all(either[s.value] == 1.0 for s in detected_by)
    # the undrifted features of the same devices keep their false-alarm rate
    assert crossed(np.delete(feature_severity(stats), drifted, axis=-1), 1.0).mean() <= 0.01


def test_binned_statistics_rank_shifts_like_raw_samples_do(baseline):
    scipy = _scipy()
    counts, edges = baseline
    rng = np.random.default_rng(3)
    shifts = [0.1, 0.3, 0.6, 1.0]
    reference = rng.standard_normal(TRAINING_ROWS)
    raw = [rng.standard_normal(20_000) + shift for shift in shifts]
    live = np.stack([bin_like_the_agent(values, edges[0]) for values in raw])
    stats = drift_stats(counts[0], live, edges[0])
    raw_order = np.argsort([scipy.stats.wasserstein_distance(reference, v) for v in raw])
    np.testing.assert_array_equal(raw_order, np.argsort(shifts))
    for statistic in (Statistic.PSI, Statistic.JS, Statistic.WASSERSTEIN):
        np.testing.assert_array_equal(np.argsort(stats.of(statistic)), raw_order)
    # The normalised Wasserstein reads as the shift in sigmas, overstated by about 15%
    # (the outer quantile bins reach the training extremes, so their midpoints sit further
    # out than the values in them) plus the sampling noise of 20,000 rows.
    print(f"\nshifts {shifts}: binned, normalised Wasserstein {np.round(stats.wasserstein, 3)}")
    np.testing.assert_allclose(stats.wasserstein, shifts, rtol=0.2, atol=0.04)


# --- agreement with independent computations ----------------------------------------------


def _psi_loop(p_counts, q_counts, epsilon=PSI_EPSILON):
    p = np.asarray(p_counts, dtype=float) / np.sum(p_counts)
    q = np.asarray(q_counts, dtype=float) / np.sum(q_counts)
    p = (p + epsilon) / (1 + len(p) * epsilon)
    q = (q + epsilon) / (1 + len(q) * epsilon)
    total = 0.0
    for expected, actual in zip(p, q, strict=True):
        total += (actual - expected) * np.log(actual / expected)
    return total


def _reference_cases(baseline):
    counts, edges = baseline
    rng = np.random.default_rng(4)
    cases = []
    for drift in (None, _shift, _scale, _twenty_percent_missing):
        live = live_windows(baseline, rng, 2, drift)
        cases += [(counts[f], live[w, f], edges[f]) for w in range(2) for f in (0, 5)]
    # sparse, lumpy histograms with empty bins on either side
    for _ in range(10):
        k = int(rng.integers(1, 40))
        base = baseline_layout(rng.integers(0, 4, k) * rng.integers(0, 2, k))
        base[1] += 1  # not empty
        live = rng.integers(0, 3, k + 3) * rng.integers(0, 2, k + 3)
        live[int(rng.integers(0, k + 3))] += 1
        cases.append((base, live, np.cumsum(rng.random(k + 1) + 0.01) - 3))
    return cases


def test_psi_equals_a_plain_loop_over_smoothed_shares(baseline):
    for base, live, _ in _reference_cases(baseline):
        assert psi(base, live) == pytest.approx(_psi_loop(base, live), abs=1e-9)


def test_js_distance_equals_scipy_jensenshannon_base_2(baseline):
    scipy = _scipy()
    for base, live, _ in _reference_cases(baseline):
        expected = scipy.spatial.distance.jensenshannon(base, live, base=2)
        assert js_distance(base, live) == pytest.approx(expected, abs=1e-9)


def test_wasserstein_equals_scipy_on_bin_positions(baseline):
    scipy = _scipy()
    for base, live, edges in _reference_cases(baseline):
        positions = bin_positions(edges)
        if live[:MISSING].sum() == 0:
            assert np.isnan(wasserstein(base, live, edges))
            continue
        expected = scipy.stats.wasserstein_distance(positions, positions, base[:MISSING],
                                                    live[:MISSING])
        assert wasserstein(base, live, edges, normalise=False) == pytest.approx(expected,
                                                                                abs=1e-9)
        assert wasserstein(base, live, edges) == pytest.approx(
            expected / baseline_scale(base, edges), abs=1e-9)


def test_all_at_once_equals_each_statistic_and_broadcasts_baselines_over_devices(baseline):
    counts, edges = baseline
    live = live_windows(baseline, np.random.default_rng(5), 6, _shift)  # (devices, f, k+3)
    stats = drift_stats(counts, live, edges)
    assert stats.psi.shape == (6, FEATURES)
    np.testing.assert_allclose(stats.psi, psi(counts, live), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.js, js_distance(counts, live), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.wasserstein, wasserstein(counts, live, edges), atol=1e-12)
    np.testing.assert_allclose(stats.missing_delta, missing_delta(counts, live), atol=1e-12)
    flat = drift_stats(np.tile(counts, (6, 1)), live.reshape(6 * FEATURES, -1),
                       np.tile(edges, (6, 1)))
    np.testing.assert_allclose(flat.js, stats.js.ravel(), atol=1e-12)
    one = drift_stats(counts[2], live[4, 2], edges[2])
    assert isinstance(float(one.psi), float) and one.psi == pytest.approx(stats.psi[4, 2])


def test_missing_delta_is_the_live_nan_share_minus_the_baseline_s():
    assert missing_delta([0, 5, 5, 0, 0], [0, 4, 4, 0, 2]) == pytest.approx(0.2)
    assert missing_delta([0, 5, 5, 0, 5], [0, 4, 4, 0, 0]) == pytest.approx(-1 / 3)


def test_live_mass_outside_the_training_range_makes_psi_large_but_finite():
    base = baseline_layout([50, 50])
    assert psi(base, [0, 50, 50, 0, 0]) == 0
    assert np.isfinite(psi(base, [0, 0, 0, 100, 0]))
    assert psi(base, [0, 45, 45, 10, 0]) > 0.2  # 10% beyond the training maximum
    assert psi(base, [0, 1000, 999, 1, 0]) < 0.01  # one value in 2,000 beyond it


def test_an_empty_live_window_gives_nan_which_never_crosses():
    stats = drift_stats(baseline_layout([5, 5]), [0, 0, 0, 0, 0], [0.0, 1.0, 2.0])
    assert np.isnan(stats.psi) and np.isnan(stats.js) and np.isnan(stats.wasserstein)
    assert np.isnan(feature_severity(stats)) and not crossed(feature_severity(stats), 1.0)
    only_missing = drift_stats(baseline_layout([5, 5]), [0, 0, 0, 0, 7], [0.0, 1.0, 2.0])
    assert np.isnan(only_missing.wasserstein) and only_missing.missing_delta == 1.0
    assert feature_severity(only_missing) > 1


counts_strategy = st.integers(min_value=1, max_value=30).flatmap(
    lambda k: st.tuples(arrays(np.int64, k + 3, elements=st.integers(0, 10_000)),
                        arrays(np.int64, k + 3, elements=st.integers(0, 10_000)))
).filter(lambda pair: pair[0][:MISSING].sum() > 0 and pair[1][:MISSING].sum() > 0)


@settings(max_examples=200, deadline=None)
@given(counts_strategy)
def test_js_is_symmetric_and_in_0_1_psi_and_wasserstein_are_non_negative_and_agree(pair):
    base, live = pair
    edges = np.arange(len(base) - 2, dtype=float)
    js = js_distance(base, live)
    assert 0 <= js <= 1
    assert js == pytest.approx(js_distance(live, base), abs=1e-12)
    assert psi(base, live) >= 0
    assert psi(base, live) == pytest.approx(psi(live, base), abs=1e-12)
    distance = wasserstein(base, live, edges, normalise=False)
    assert distance >= 0
    assert distance == pytest.approx(wasserstein(live, base, edges, normalise=False), abs=1e-9)
    assert js_distance(base, base) == 0 and psi(base, base) == 0
    scipy = _scipy()
    assert js == pytest.approx(scipy.spatial.distance.jensenshannon(base, live, base=2),
                               abs=1e-9)
    positions = bin_positions(edges)
    assert distance == pytest.approx(scipy.stats.wasserstein_distance(
        positions, positions, base[:MISSING], live[:MISSING]), abs=1e-9)


# --- scores, thresholds, hysteresis ------------------------------------------------------


def _stats(psi_values, js_values=None):
    """Statistics with only PSI (and JS) measured; the others unknown."""
    values = np.asarray(psi_values, dtype=float)
    unknown = np.full_like(values, np.nan)
    return DriftStats(psi=values, js=unknown if js_values is None else np.asarray(js_values),
                      wasserstein=unknown, missing_delta=unknown)


def test_feature_severity_is_the_worst_statistic_relative_to_its_threshold():
    stats = _stats([0.1, 0.4, np.nan], [0.15, 0.0, np.nan])
    np.testing.assert_allclose(feature_severity(stats), [1.5, 2.0, np.nan])


def test_device_score_is_the_max_or_a_weighted_mean_over_features():
    stats = _stats([[0.1, 0.3, np.nan], [0.0, 0.0, 0.0]])
    names = ["a", "b", "c"]
    by_max = device_score(stats, names, ScorePolicy(Statistic.PSI))
    np.testing.assert_allclose(by_max, [0.3, 0.0])
    weighted = device_score(stats, names,
                            ScorePolicy(Statistic.PSI, Reduction.MEAN, {"a": 3.0, "b": 1.0}))
    np.testing.assert_allclose(weighted, [(0.3 + 0.3) / 4, 0.0])  # c: no data, left out
    assert np.isnan(device_score(_stats([np.nan, np.nan]), ["a", "b"]))
    assert crossed(by_max, DriftThresholds().of(Statistic.PSI)).tolist() == [True, False]


def test_hysteresis_raises_above_the_threshold_and_clears_only_below_the_clear_level():
    state = AlertState()
    changes = []
    for value in (0.1, 0.25, 0.19, 0.17, np.nan, 0.21, 0.15, 0.18):
        state, change = state.step(value, threshold=0.2, clear_ratio=0.8)
        changes.append((change, state.raised))
    assert changes == [
        (AlertChange.NONE, False),
        (AlertChange.RAISED, True),
        (AlertChange.NONE, True),  # between 0.16 and 0.2: still raised
        (AlertChange.NONE, True),
        (AlertChange.NONE, True),  # no data: unchanged
        (AlertChange.NONE, True),
        (AlertChange.CLEARED, False),  # below 0.8 * 0.2
        (AlertChange.NONE, False),  # between: does not raise again
    ]
    raised = step_alerts([False, False, True, True], [0.3, 0.19, 0.17, 0.1], 0.2)
    assert raised.tolist() == [True, False, True, False]


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "error"), [
    (lambda: psi([0, 1, 1, 0, 0], [0, 1, 1, 0]), BinCountMismatchError),
    (lambda: psi(np.ones((2, 5)), np.ones((3, 5))), BinCountMismatchError),
    (lambda: psi([0, 1, 0], [0, 1, 0]), BinCountMismatchError),
    (lambda: psi(5, 5), BinCountMismatchError),
    (lambda: wasserstein([0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0.0, 1.0, 2.0, 3.0]),
     BinCountMismatchError),
    (lambda: psi([0, 1, -1, 0, 0], [0, 1, 1, 0, 0]), BadCountError),
    (lambda: js_distance([0, 1, 1, 0, 0], [0, 1, np.nan, 0, 0]), BadCountError),
    (lambda: wasserstein([0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0.0, 2.0, 1.0]), BadEdgesError),
    (lambda: wasserstein([0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0.0, 1.0, 1.0]), BadEdgesError),
    (lambda: bin_positions([0.0, np.inf]), BadEdgesError),
    (lambda: psi(np.ones(513), np.ones(513)), TooManyBinsError),
    (lambda: baseline_layout(np.ones(510)), TooManyBinsError),
    (lambda: bin_positions(np.arange(511.0)), TooManyBinsError),
    (lambda: psi([0, 0, 0, 0, 3], [0, 1, 1, 0, 0]), EmptyBaselineError),
    (lambda: DriftThresholds(psi=0), DriftConfigError),
    (lambda: DriftThresholds(clear_ratio=1.5), DriftConfigError),
    (lambda: ScorePolicy(weights={"a": -1}), DriftConfigError),
    (lambda: device_score(_stats([0.1, 0.2]), ["a"]), DriftConfigError),
    (lambda: device_score(_stats([0.1, 0.2]), ["a", "b"], ScorePolicy(weights={"z": 1})),
     DriftConfigError),
    (lambda: psi([0, 1, 1, 0, 0], [0, 1, 1, 0, 0], epsilon=0), DriftConfigError),
], ids=["lengths", "leading-shape", "too-few-bins", "scalar", "edges-for-other-bins",
        "negative", "nan-count", "edges-decreasing", "edges-repeated", "edges-infinite",
        "513-bins", "layout-over-512", "edges-over-512", "empty-baseline", "zero-threshold",
        "clear-ratio", "negative-weight", "names-count", "unknown-weight", "epsilon"])
def test_bad_input_is_refused_with_a_named_error(call, error):
    with pytest.raises(error) as refused:
        call()
    assert isinstance(refused.value, DriftInputError)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, FleetError)
    assert str(refused.value)
