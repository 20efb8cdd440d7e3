"""Drift statistics: how far a device's live histograms are from the bundle's baseline.

Pure numpy, no IO: the ingest and the rollout gates call these on arrays they have read.

**The layout (a wire contract with the agent).** A baseline feature has ``edges`` (k+1
strictly increasing floats) and ``counts`` (k, ``np.histogram`` semantics). A device bins
each live value ``x`` with ``i = searchsorted(edges, x, side="right")`` into ``k + 3``
columns::

    [underflow (x < edges[0])] + k inner bins + [overflow (x > edges[-1])] + [missing (NaN)]

``x == edges[-1]`` goes to the last inner bin, as in ``np.histogram``. The baseline is
compared in the same layout (:func:`baseline_layout`: zeros in underflow, overflow and
missing), so every statistic below takes two arrays of the same last dimension ``k + 3``.

**Many histograms at once.** Every function takes arrays of shape ``(..., k + 3)`` (edges
``(..., k + 1)``) and broadcasts the leading dimensions: a baseline ``(features, k + 3)``
against live windows ``(devices, features, k + 3)`` gives ``(devices, features)``; one 1-D
histogram gives a scalar. Features with different bin counts are computed in separate calls
(one per bin count). A live window with no counts at all has no distribution: its
statistics are NaN, and NaN never crosses a threshold (no data says nothing).

**The statistics** (``p`` baseline, ``q`` live, each divided by its total):

* PSI, smoothed so that bins empty on one side stay finite (:data:`PSI_EPSILON`);
* Jensen-Shannon distance, base 2, in [0, 1], unsmoothed (finite without smoothing);
* Wasserstein-1 on bin positions, missing values excluded, in units of the baseline's
  robust standard deviation (so one threshold fits every feature);
* the missing-rate delta (live NaN share minus the baseline's), reported apart because the
  Wasserstein distance cannot place a missing value.

**Deciding.** :class:`DriftThresholds` holds one threshold per statistic; a feature's
*severity* is its largest statistic-to-threshold ratio (> 1: it crosses). A device's score
reduces one statistic (or the severity) over its features with ``max`` or a weighted mean.
Alerts have hysteresis (:class:`AlertState`): raised above the threshold, cleared only below
``clear_ratio`` times it, so a statistic hovering around its threshold does not flap.

Bad input is refused with a :class:`DriftInputError` subclass naming what is wrong: a
histogram from a device is untrusted, and a wrong shape must not broadcast silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from agent.contract import MAX_HISTOGRAM_BINS
from fleet.errors import InvalidRequestError

__all__ = [
    "DEFAULT_CLEAR_RATIO",
    "LAYOUT_EXTRA",
    "MAX_LAYOUT_BINS",
    "MISSING",
    "OVERFLOW",
    "PSI_EPSILON",
    "ROBUST_SIGMA_IQR",
    "UNDERFLOW",
    "AlertChange",
    "AlertState",
    "BadCountError",
    "BadEdgesError",
    "BinCountMismatchError",
    "DriftConfigError",
    "DriftInputError",
    "DriftStats",
    "DriftThresholds",
    "EmptyBaselineError",
    "Reduction",
    "ScorePolicy",
    "Statistic",
    "TooManyBinsError",
    "baseline_layout",
    "baseline_scale",
    "bin_positions",
    "crossed",
    "device_score",
    "drift_stats",
    "feature_severity",
    "js_distance",
    "missing_delta",
    "psi",
    "step_alerts",
    "wasserstein",
]

# Column indices of the live layout; the k inner bins are 1..k.
UNDERFLOW = 0
OVERFLOW = -2
MISSING = -1
LAYOUT_EXTRA = 3  # underflow + overflow + missing
# The device sends its k + 3 counts in one contract histogram, so the layout is what the
# contract bounds (a baseline of more than MAX_LAYOUT_BINS - 3 inner bins cannot be sent).
MAX_LAYOUT_BINS = MAX_HISTOGRAM_BINS

# Added to every bin's share before PSI's log ratio. Small enough that 20 equal-mass bins
# (5% each) are not moved, large enough that live mass where the baseline has none gives a
# large but finite term: a share m there adds about m * ln(m / 1e-4), so 1 value in 2,000
# outside the training range adds 0.001 and 5% of values missing adds 0.31.
PSI_EPSILON = 1e-4
# IQR of a normal distribution in standard deviations (2 * Phi^-1(0.75)): IQR / this is a
# robust sigma, insensitive to the training minimum and maximum that bound the outer bins.
ROBUST_SIGMA_IQR = 1.3489795003921634
DEFAULT_CLEAR_RATIO = 0.8


class DriftInputError(InvalidRequestError, ValueError):
    """Histograms, edges or settings the statistics cannot be computed on."""

    reason = "drift_input"


class BinCountMismatchError(DriftInputError):
    """Baseline, live counts and edges disagree on the number of bins (or are too few)."""

    reason = "bin_count_mismatch"


class BadCountError(DriftInputError):
    """A count that is negative, NaN or infinite."""

    reason = "bad_count"


class BadEdgesError(DriftInputError):
    """Bin edges that are not finite and strictly increasing."""

    reason = "bad_edges"


class TooManyBinsError(DriftInputError):
    """More bins than the wire contract allows in one histogram."""

    reason = "too_many_bins"


class EmptyBaselineError(DriftInputError):
    """A baseline with no counts (in its inner bins): nothing to compare against."""

    reason = "empty_baseline"


class DriftConfigError(DriftInputError):
    """Thresholds, weights or feature names that do not make sense."""

    reason = "drift_config"


Array = NDArray[np.float64]


# --- validation -------------------------------------------------------------------------


def _counts(what: str, counts: ArrayLike) -> Array:
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim == 0:
        raise BinCountMismatchError(f"{what}: a histogram needs a bins axis, given a scalar")
    bins = array.shape[-1]
    if bins > MAX_LAYOUT_BINS:
        raise TooManyBinsError(f"{what}: {bins} bins, at most {MAX_LAYOUT_BINS}")
    if bins < LAYOUT_EXTRA + 1:
        raise BinCountMismatchError(
            f"{what}: {bins} bins; the layout is underflow + k >= 1 inner + overflow + missing"
        )
    if not np.isfinite(array).all():
        raise BadCountError(f"{what}: counts must be finite")
    if (array < 0).any():
        raise BadCountError(f"{what}: counts must be >= 0, found {array.min():g}")
    return array


def _pair(baseline: ArrayLike, live: ArrayLike) -> tuple[Array, Array]:
    base = _counts("baseline", baseline)
    window = _counts("live", live)
    if base.shape[-1] != window.shape[-1]:
        raise BinCountMismatchError(
            f"baseline has {base.shape[-1]} bins, live {window.shape[-1]}: "
            "both must use the k + 3 layout of the same edges"
        )
    try:
        np.broadcast_shapes(base.shape, window.shape)
    except ValueError:
        raise BinCountMismatchError(
            f"baseline {base.shape} and live {window.shape} do not broadcast"
        ) from None
    if (base[..., :MISSING].sum(axis=-1) <= 0).any():
        raise EmptyBaselineError("baseline: a histogram with no counts in its bins")
    return base, window


def _edges(edges: ArrayLike, bins: int | None = None) -> Array:
    """Edges checked, and (given ``bins``) checked to fit histograms of that many columns."""
    array = np.asarray(edges, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] < 2:
        raise BadEdgesError("edges: at least two are needed (one inner bin)")
    if array.shape[-1] + LAYOUT_EXTRA - 1 > MAX_LAYOUT_BINS:
        raise TooManyBinsError(
            f"edges: {array.shape[-1] - 1} inner bins make a layout of more than "
            f"{MAX_LAYOUT_BINS} bins"
        )
    if bins is not None and array.shape[-1] + LAYOUT_EXTRA - 1 != bins:
        raise BinCountMismatchError(
            f"{array.shape[-1]} edges make {array.shape[-1] + 2} layout bins, "
            f"the histograms have {bins}"
        )
    if not np.isfinite(array).all():
        raise BadEdgesError("edges must be finite")
    if not (np.diff(array, axis=-1) > 0).all():
        raise BadEdgesError("edges must be strictly increasing")
    return array


def _shares(counts: Array) -> Array:
    """Counts over their total; a histogram with no counts gives NaN shares."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return counts / counts.sum(axis=-1, keepdims=True)


# --- layout -----------------------------------------------------------------------------


def baseline_layout(counts: ArrayLike) -> Array:
    """The bundle's k baseline counts in the k + 3 live layout (zeros outside the range).

    The training data had no value outside its own range and none missing, so those
    columns are empty: live mass landing there is drift by construction.
    """
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] < 1:
        raise BinCountMismatchError("baseline: at least one inner bin is needed")
    if array.shape[-1] + LAYOUT_EXTRA > MAX_LAYOUT_BINS:
        raise TooManyBinsError(
            f"baseline: {array.shape[-1]} inner bins make a layout of more than "
            f"{MAX_LAYOUT_BINS} bins"
        )
    pad = [(0, 0)] * (array.ndim - 1)
    return np.pad(array, [*pad, (1, 2)])


def bin_positions(edges: ArrayLike) -> Array:
    """Where each non-missing column sits on the feature's axis, for the Wasserstein distance.

    Inner bins at their midpoints. Underflow and overflow at the midpoint of a virtual bin
    of the outermost bin's width just outside the range (``edges[0] - w_0 / 2`` and
    ``edges[-1] + w_last / 2``): a value there is known only to be beyond the edge, and
    this places it as far out as the neighbouring bin's values are in. Shape ``(..., k+2)``.
    """
    array = _edges(edges)
    mid = (array[..., :-1] + array[..., 1:]) / 2
    below = array[..., :1] - (array[..., 1:2] - array[..., :1]) / 2
    above = array[..., -1:] + (array[..., -1:] - array[..., -2:-1]) / 2
    return np.concatenate([below, mid, above], axis=-1)


def baseline_scale(baseline: ArrayLike, edges: ArrayLike) -> Array:
    """The baseline's robust standard deviation: its interquartile range / 1.349.

    Quartiles are read off the baseline's inner bins, the CDF interpolated linearly inside
    a bin. Not the binned standard deviation: the outer bins of quantile edges reach to the
    training minimum and maximum, which would make the scale depend on two outliers.
    """
    base = _counts("baseline", baseline)
    bounds = _edges(edges, base.shape[-1])
    inner = base[..., 1:OVERFLOW]
    totals = inner.sum(axis=-1, keepdims=True)
    if (totals <= 0).any():
        raise EmptyBaselineError("baseline: a histogram with no counts in its inner bins")
    cdf = np.concatenate([np.zeros_like(totals), np.cumsum(inner, axis=-1) / totals], axis=-1)
    shape = np.broadcast_shapes(cdf.shape, bounds.shape)
    cdf, bounds = np.broadcast_to(cdf, shape), np.broadcast_to(bounds, shape)
    quartiles = []
    for level in (0.25, 0.75):
        # cdf[j - 1] < level <= cdf[j]: j >= 1 as cdf[0] = 0, j <= k as cdf[k] = 1.
        j = np.minimum((cdf < level).sum(axis=-1, keepdims=True), shape[-1] - 1)
        lo_p, hi_p = np.take_along_axis(cdf, j - 1, -1), np.take_along_axis(cdf, j, -1)
        lo_x, hi_x = np.take_along_axis(bounds, j - 1, -1), np.take_along_axis(bounds, j, -1)
        quartiles.append(lo_x + (level - lo_p) / (hi_p - lo_p) * (hi_x - lo_x))
    return ((quartiles[1] - quartiles[0]) / ROBUST_SIGMA_IQR)[..., 0]


# --- statistics -------------------------------------------------------------------------


def _psi(p: Array, q: Array, epsilon: float) -> Array:
    bins = p.shape[-1]
    with np.errstate(invalid="ignore"):
        terms = (q - p) * (np.log(q + epsilon) - np.log(p + epsilon))
    return terms.sum(axis=-1) / (1 + bins * epsilon)


def psi(baseline: ArrayLike, live: ArrayLike, *, epsilon: float = PSI_EPSILON) -> Array:
    """Population stability index of live against baseline, over all k + 3 columns.

    With shares ``p = baseline / sum``, ``q = live / sum`` over B = k + 3 columns, each is
    smoothed as ``p' = (p + epsilon) / (1 + B * epsilon)`` (an epsilon of mass added to
    every bin, then renormalised), and::

        PSI = sum_i (q'_i - p'_i) * ln(q'_i / p'_i)
            = sum_i (q_i - p_i) * ln((q_i + epsilon) / (p_i + epsilon)) / (1 + B * epsilon)

    Every term is >= 0. Columns empty on both sides add exactly 0; live mass ``m`` where the
    baseline has none (underflow, overflow, missing) adds about ``m * ln(m / epsilon)``:
    finite, and large once m is a few percent. Rule of thumb (credit scoring): < 0.1 stable,
    0.1 to 0.25 moderate shift, > 0.25 major shift.
    """
    if not 0 < epsilon < 1:
        raise DriftConfigError(f"epsilon must be in (0, 1), not {epsilon}")
    base, window = _pair(baseline, live)
    return _psi(_shares(base), _shares(window), epsilon)


def _relative_entropy_terms(x: Array, m: Array) -> Array:
    """``x * ln(x / m)``, 0 where ``x == 0`` (as scipy.special.rel_entr)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = x * np.log(x / m)
    return np.where(x > 0, terms, 0.0)


def _js(p: Array, q: Array) -> Array:
    m = (p + q) / 2
    divergence = (_relative_entropy_terms(p, m) + _relative_entropy_terms(q, m)).sum(axis=-1)
    return np.sqrt(np.maximum(divergence / 2 / np.log(2), 0.0))


def js_distance(baseline: ArrayLike, live: ArrayLike) -> Array:
    """Jensen-Shannon distance (base 2, in [0, 1]) over all k + 3 columns, unsmoothed.

    ``sqrt(JSD)`` with ``JSD = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``, logs in
    base 2: the same number as ``scipy.spatial.distance.jensenshannon(baseline, live, base=2)``.
    No smoothing is needed (``m > 0`` wherever p or q is), so none is applied. Symmetric,
    0 for equal distributions, 1 for disjoint ones; mass moving into the missing or
    out-of-range columns counts like any other.
    """
    base, window = _pair(baseline, live)
    return _js(_shares(base), _shares(window))


def _wasserstein(base: Array, window: Array, positions: Array) -> Array:
    # Both distributions over the k + 2 non-missing columns; W1 = integral of |F_p - F_q|,
    # and between consecutive positions the two CDFs are constant.
    located_base, located_live = base[..., :MISSING], window[..., :MISSING]
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = (located_base / located_base.sum(axis=-1, keepdims=True)
               - located_live / located_live.sum(axis=-1, keepdims=True))
    cdf_gap = np.cumsum(gap[..., :-1], axis=-1)
    return (np.abs(cdf_gap) * np.diff(positions, axis=-1)).sum(axis=-1)


def wasserstein(baseline: ArrayLike, live: ArrayLike, edges: ArrayLike, *,
                normalise: bool = True) -> Array:
    """Wasserstein-1 (earth mover's) distance between the binned distributions.

    Each non-missing column's mass sits at its :func:`bin_positions` position; missing
    values are left out (both sides renormalised over the other k + 2 columns; see
    :func:`missing_delta`). Unnormalised, it equals ``scipy.stats.wasserstein_distance(pos,
    pos, baseline[:-1], live[:-1])``. With ``normalise`` (the default) it is divided by the
    baseline's robust standard deviation (:func:`baseline_scale`), so it reads as "the
    distribution moved by this many sigmas" whatever the feature's unit, and one threshold
    fits all features. A live window of only missing values gives NaN.
    """
    base, window = _pair(baseline, live)
    positions = bin_positions(_edges(edges, base.shape[-1]))
    distance = _wasserstein(base, window, positions)
    if normalise:
        distance = distance / baseline_scale(base, edges)
    return distance


def missing_delta(baseline: ArrayLike, live: ArrayLike) -> Array:
    """Live share of missing values (NaN or absent) minus the baseline's: in [-1, 1]."""
    base, window = _pair(baseline, live)
    return _missing_delta(_shares(base), _shares(window))


def _missing_delta(p: Array, q: Array) -> Array:
    return q[..., MISSING] - p[..., MISSING]


class Statistic(StrEnum):
    PSI = "psi"
    JS = "js"
    WASSERSTEIN = "wasserstein"
    MISSING = "missing"  # |missing_delta|
    SEVERITY = "severity"  # the largest statistic / threshold ratio (needs thresholds)


@dataclass(frozen=True)
class DriftStats:
    """Every statistic for the same histograms, each of the broadcast leading shape."""

    psi: Array
    js: Array
    wasserstein: Array  # in baseline robust sigmas
    missing_delta: Array  # signed: live - baseline

    MEASURED: ClassVar[tuple[Statistic, ...]] = (
        Statistic.PSI, Statistic.JS, Statistic.WASSERSTEIN, Statistic.MISSING,
    )

    def of(self, statistic: Statistic) -> Array:
        """One measured statistic as a magnitude (the missing delta as its absolute value)."""
        if statistic is Statistic.MISSING:
            return np.abs(self.missing_delta)
        if statistic is Statistic.SEVERITY:
            raise DriftConfigError("severity needs thresholds: use feature_severity()")
        return getattr(self, statistic.value)


def drift_stats(baseline: ArrayLike, live: ArrayLike, edges: ArrayLike, *,
                epsilon: float = PSI_EPSILON) -> DriftStats:
    """Every statistic at once, validating and normalising the histograms only once.

    Same arguments and broadcasting as the single functions; the result's arrays equal
    theirs (``wasserstein`` normalised).
    """
    if not 0 < epsilon < 1:
        raise DriftConfigError(f"epsilon must be in (0, 1), not {epsilon}")
    base, window = _pair(baseline, live)
    bounds = _edges(edges, base.shape[-1])
    p, q = _shares(base), _shares(window)
    distance = _wasserstein(base, window, bin_positions(bounds))
    return DriftStats(
        psi=_psi(p, q, epsilon),
        js=_js(p, q),
        wasserstein=distance / baseline_scale(base, bounds),
        missing_delta=_missing_delta(p, q),
    )


# --- deciding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftThresholds:
    """When a statistic means drift. Defaults from common practice, checked by the tests.

    * ``psi`` 0.2: between the credit-scoring rule's "moderate" (0.1) and "major" (0.25);
      a mean shift of 0.5 sigma gives about 0.25, 2,000 unshifted values about 0.01;
    * ``js`` 0.1 (distance, base 2; Evidently's default): 2,000 unshifted values give
      about 0.04, a 0.5 sigma shift about 0.2;
    * ``wasserstein`` 0.1 robust sigmas (Evidently's default for its normed Wasserstein);
    * ``missing`` 0.05: five percentage points more (or fewer) missing values than training;
    * ``clear_ratio`` 0.8: an alert clears below 80% of its threshold (hysteresis).
    """

    psi: float = 0.2
    js: float = 0.1
    wasserstein: float = 0.1
    missing: float = 0.05
    clear_ratio: float = DEFAULT_CLEAR_RATIO

    def __post_init__(self) -> None:
        for name in ("psi", "js", "wasserstein", "missing"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise DriftConfigError(f"threshold {name} must be > 0, not {value}")
        if not 0 < self.clear_ratio <= 1:
            raise DriftConfigError(f"clear_ratio must be in (0, 1], not {self.clear_ratio}")

    def of(self, statistic: Statistic) -> float:
        """The threshold for one statistic (severity's is 1: a ratio to the thresholds)."""
        if statistic is Statistic.SEVERITY:
            return 1.0
        return float(getattr(self, statistic.value))


def feature_severity(stats: DriftStats, thresholds: DriftThresholds | None = None) -> Array:
    """Per feature, the largest ``statistic / its threshold``: > 1 means some statistic
    crosses. NaN statistics are ignored; NaN if all of them are (an empty window)."""
    thresholds = thresholds or DriftThresholds()
    ratios = np.stack([stats.of(s) / thresholds.of(s) for s in DriftStats.MEASURED])
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isnan(ratios), -np.inf, ratios).max(axis=0)
    return np.where(np.isneginf(finite), np.nan, finite)


class Reduction(StrEnum):
    MAX = "max"
    MEAN = "mean"  # weighted by ScorePolicy.weights


@dataclass(frozen=True)
class ScorePolicy:
    """How one device's features make its drift score.

    ``max`` over features (the worst feature decides) or a weighted ``mean`` (a feature
    absent from ``weights`` weighs 1; weight 0 ignores it). NaN features (no data) are left
    out of either; a device with none gives NaN.
    """

    statistic: Statistic = Statistic.SEVERITY
    reduction: Reduction = Reduction.MAX
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            if not (np.isfinite(weight) and weight >= 0):
                raise DriftConfigError(f"weight of {name!r} must be >= 0, not {weight}")


def device_score(stats: DriftStats, feature_names: Sequence[str],
                 policy: ScorePolicy | None = None,
                 thresholds: DriftThresholds | None = None) -> Array:
    """One score per device: the policy's statistic reduced over the last (feature) axis.

    Compare it with ``thresholds.of(policy.statistic)`` (:func:`crossed`). Weights naming a
    feature not in ``feature_names`` are refused: a typo would otherwise weigh nothing.
    """
    policy = policy or ScorePolicy()
    thresholds = thresholds or DriftThresholds()
    if policy.statistic is Statistic.SEVERITY:
        values = feature_severity(stats, thresholds)
    else:
        values = stats.of(policy.statistic)
    names = list(feature_names)
    if values.ndim == 0 or values.shape[-1] != len(names):
        raise DriftConfigError(
            f"{len(names)} feature names for statistics of shape {values.shape}"
        )
    if len(set(names)) != len(names):
        raise DriftConfigError("feature names must be unique")
    unknown = sorted(set(policy.weights) - set(names))
    if unknown:
        raise DriftConfigError(f"weights name unknown features: {', '.join(unknown)}")
    known = ~np.isnan(values)
    if policy.reduction is Reduction.MAX:
        best = np.where(known, values, -np.inf).max(axis=-1)
        return np.where(np.isneginf(best), np.nan, best)
    weights = np.array([policy.weights.get(name, 1.0) for name in names], dtype=np.float64)
    weights = np.where(known, weights, 0.0)
    total = weights.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(known, values, 0.0) * weights).sum(axis=-1) / total


def crossed(values: ArrayLike, threshold: float) -> NDArray[np.bool_]:
    """Where a statistic (or score) is above its threshold; NaN (no data) never is."""
    return np.asarray(values, dtype=np.float64) > threshold


class AlertChange(StrEnum):
    NONE = "none"
    RAISED = "raised"
    CLEARED = "cleared"


def step_alerts(raised: ArrayLike, values: ArrayLike, threshold: float,
                clear_ratio: float = DEFAULT_CLEAR_RATIO) -> NDArray[np.bool_]:
    """The next alert flags for many (device, feature) pairs at once.

    A clear alert is raised when the value is above ``threshold``; a raised one clears only
    when the value is below ``clear_ratio * threshold``. Between the two, and on NaN (no
    data this window), nothing changes.
    """
    if not 0 < clear_ratio <= 1:
        raise DriftConfigError(f"clear_ratio must be in (0, 1], not {clear_ratio}")
    flags = np.asarray(raised, dtype=bool)
    value = np.asarray(values, dtype=np.float64)
    return np.where(flags, ~(value < clear_ratio * threshold), value > threshold)


@dataclass(frozen=True)
class AlertState:
    """One (device, feature) alert with hysteresis; :meth:`step` returns the next state."""

    raised: bool = False

    def step(self, value: float, threshold: float,
             clear_ratio: float = DEFAULT_CLEAR_RATIO) -> tuple[AlertState, AlertChange]:
        raised = bool(step_alerts(self.raised, value, threshold, clear_ratio))
        if raised == self.raised:
            return self, AlertChange.NONE
        return AlertState(raised), AlertChange.RAISED if raised else AlertChange.CLEARED
