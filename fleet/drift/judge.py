"""Judging one drift message against its bundle's baseline: every statistic per feature,
the device's score, the features that cross.

Pure, like :mod:`fleet.drift.stats` which it calls: the ingest reads the baseline and the
settings, then stores what this returns. A feature the baseline does not know, or whose
count of bins differs from the baseline's, is left out and named (``refused``): counts from
a device are untrusted, and one bad feature must not cost the others their judgement.

**Too few rows say nothing.** Sampling noise alone moves every statistic: for N(0,1) values
on a 20-bin baseline, the worst of four features in a window crosses the default
thresholds (JS 0.1 and Wasserstein 0.1 first) in 99.7% of windows of 300 values, 11% of
800, 0.7% of 1,600 and none of 3,200 (300 windows each). So a feature whose window binned
fewer than ``min_rows`` values (2,000 by default) gets no statistics (None) and moves no
alert. A device serving fewer rows per window than that is judged with longer windows
(``edge-agent run --drift-window``) or a lower ``min_rows`` with higher thresholds.

**Thresholds come in three layers**: the fleet's defaults (``DriftThresholds()``), what the
bundle's ``baseline.json`` proposes for its model, and an operator's settings for the model
name (``edge-fleet drift policy``), each overriding the one before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from agent.contract import Baseline, DriftThresholdSpec, FeatureHistogram
from fleet.drift.stats import (
    DriftConfigError,
    DriftThresholds,
    Reduction,
    ScorePolicy,
    baseline_layout,
    drift_stats,
    feature_severity,
)

__all__ = [
    "DEFAULT_MIN_ROWS",
    "DriftSettings",
    "FeatureVerdict",
    "PreparedBaseline",
    "Verdict",
    "judge",
]

DEFAULT_MIN_ROWS = 2000
MAX_MIN_ROWS = 10_000_000
SETTING_NAMES = ("psi", "js", "wasserstein", "missing", "clear_ratio", "min_rows",
                 "reduction", "weights")


@dataclass(frozen=True)
class DriftSettings:
    """How one model's drift is judged: thresholds, the device score, rows needed."""

    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    score: ScorePolicy = field(default_factory=ScorePolicy)
    min_rows: int = DEFAULT_MIN_ROWS

    @classmethod
    def layered(cls, bundle: DriftThresholdSpec | None, operator: Mapping[str, Any]
                ) -> DriftSettings:
        """The fleet's defaults, then the bundle's thresholds, then the operator's
        settings (see :func:`check_operator_settings` for what those may hold)."""
        thresholds = DriftThresholds()
        if bundle is not None:
            given = {f.name: getattr(bundle, f.name) for f in fields(DriftThresholds)
                     if getattr(bundle, f.name, None) is not None}
            thresholds = replace(thresholds, **given)
        operator = check_operator_settings(operator)
        thresholds = replace(thresholds, **{
            name: operator[name] for name in ("psi", "js", "wasserstein", "missing",
                                              "clear_ratio") if name in operator})
        score = ScorePolicy(reduction=Reduction(operator.get("reduction", "max")),
                            weights=dict(operator.get("weights", {})))
        return cls(thresholds=thresholds, score=score,
                   min_rows=int(operator.get("min_rows", DEFAULT_MIN_ROWS)))

    def describe(self) -> dict[str, Any]:
        t = self.thresholds
        return {"psi": t.psi, "js": t.js, "wasserstein": t.wasserstein, "missing": t.missing,
                "clear_ratio": t.clear_ratio, "min_rows": self.min_rows,
                "reduction": self.score.reduction.value, "weights": dict(self.score.weights)}


def check_operator_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """An operator's settings for a model, checked: a :class:`DriftConfigError` names the
    first thing wrong. Unknown names are refused (a typo must not be silently ignored)."""
    if not isinstance(settings, Mapping):
        raise DriftConfigError("drift settings must be an object")
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise DriftConfigError(f"unknown drift setting {unknown[0]!r}; known: "
                               f"{', '.join(SETTING_NAMES)}")
    checked = dict(settings)
    numbers = {name: checked[name] for name in ("psi", "js", "wasserstein", "missing",
                                                 "clear_ratio") if name in checked}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DriftConfigError(f"{name} must be a number, not {value!r}")
    DriftThresholds(**numbers)  # range checks
    if "min_rows" in checked:
        value = checked["min_rows"]
        if isinstance(value, bool) or not isinstance(value, int) or not (
                1 <= value <= MAX_MIN_ROWS):
            raise DriftConfigError(f"min_rows must be an integer in 1..{MAX_MIN_ROWS}")
    if "reduction" in checked and checked["reduction"] not in {r.value for r in Reduction}:
        raise DriftConfigError(f"reduction must be 'max' or 'mean', not "
                               f"{checked['reduction']!r}")
    weights = checked.get("weights", {})
    if not isinstance(weights, Mapping) or len(weights) > 4096 or not all(
            isinstance(k, str) and len(k) <= 200 and isinstance(v, int | float)
            and not isinstance(v, bool) for k, v in weights.items()):
        raise DriftConfigError("weights must be an object of feature name -> number")
    ScorePolicy(weights=dict(weights))  # >= 0, finite
    return checked


@dataclass(frozen=True)
class _Group:
    """The baseline's features with one count of bins, stacked for one numpy call."""

    names: tuple[str, ...]
    layout: np.ndarray  # (features, k + 3)
    edges: np.ndarray  # (features, k + 1)


class PreparedBaseline:
    """A baseline as arrays, built once per bundle and reused for every message."""

    def __init__(self, baseline: Baseline) -> None:
        self.rows = baseline.rows
        self.thresholds = baseline.thresholds
        self.index: dict[str, tuple[int, int]] = {}  # feature -> (bins k, row in group)
        by_bins: dict[int, list[Any]] = {}
        for histogram in baseline.features:
            group = by_bins.setdefault(len(histogram.counts), [])
            self.index[histogram.feature] = (len(histogram.counts), len(group))
            group.append(histogram)
        self.groups: dict[int, _Group] = {
            k: _Group(
                names=tuple(h.feature for h in group),
                layout=baseline_layout(np.array([h.counts for h in group], dtype=np.float64)),
                edges=np.array([h.edges for h in group], dtype=np.float64),
            )
            for k, group in by_bins.items()
        }

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.index)

    def edges_of(self, feature: str) -> np.ndarray | None:
        where = self.index.get(feature)
        return None if where is None else self.groups[where[0]].edges[where[1]]


@dataclass(frozen=True)
class FeatureVerdict:
    """One feature of one window. The statistics are None when the window binned fewer
    than ``min_rows`` values of it (or none): nothing to judge."""

    feature: str
    rows: int
    psi: float | None
    js: float | None
    wasserstein: float | None
    missing_delta: float | None
    severity: float | None  # the largest statistic / threshold: > 1 crosses

    @property
    def crosses(self) -> bool:
        return self.severity is not None and self.severity > 1.0

    def stored(self) -> list[float | int | None]:
        """The compact form kept per window: [psi, js, wasserstein, missing_delta,
        severity, rows]."""
        return [self.psi, self.js, self.wasserstein, self.missing_delta, self.severity,
                self.rows]


STORED_FIELDS = ("psi", "js", "wasserstein", "missing_delta", "severity", "rows")


@dataclass(frozen=True)
class Verdict:
    features: tuple[FeatureVerdict, ...]
    score: float | None  # None: no feature had enough rows
    refused: tuple[str, ...]  # "feature: why", for features left out

    @property
    def crossing(self) -> list[str]:
        """The features that cross, worst first."""
        hot = [f for f in self.features if f.crosses]
        return [f.feature for f in sorted(hot, key=lambda f: -(f.severity or 0.0))]


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def judge(baseline: PreparedBaseline, live: Sequence[FeatureHistogram],
          settings: DriftSettings) -> Verdict:
    """Every statistic for the message's features; features with different bin counts
    are computed in one call per count."""
    refused: list[str] = []
    picked: dict[int, list[tuple[int, FeatureHistogram]]] = {}
    seen: set[str] = set()
    for histogram in live:
        where = baseline.index.get(histogram.feature)
        if histogram.feature in seen:
            refused.append(f"{histogram.feature}: sent twice in one message")
            continue
        seen.add(histogram.feature)
        if where is None:
            refused.append(f"{histogram.feature}: not a feature of the baseline")
            continue
        k, _ = where
        if len(histogram.counts) != k + 3:
            refused.append(f"{histogram.feature}: {len(histogram.counts)} counts, the "
                           f"baseline's layout has {k + 3}")
            continue
        picked.setdefault(k, []).append((where[1], histogram))
    verdicts: list[FeatureVerdict] = []
    for k, items in picked.items():
        group = baseline.groups[k]
        rows_at = [row for row, _ in items]
        counts = np.array([h.counts for _, h in items], dtype=np.float64)
        totals = counts.sum(axis=1)
        stats = drift_stats(group.layout[rows_at], counts, group.edges[rows_at])
        severity = feature_severity(stats, settings.thresholds)
        for i, (_, histogram) in enumerate(items):
            enough = totals[i] >= settings.min_rows
            verdicts.append(FeatureVerdict(
                feature=histogram.feature,
                rows=int(totals[i]),
                psi=_number(stats.psi[i]) if enough else None,
                js=_number(stats.js[i]) if enough else None,
                wasserstein=_number(stats.wasserstein[i]) if enough else None,
                missing_delta=_number(stats.missing_delta[i]) if enough else None,
                severity=_number(severity[i]) if enough else None,
            ))
    verdicts.sort(key=lambda v: baseline.index[v.feature])
    return Verdict(features=tuple(verdicts), score=_score(verdicts, settings),
                   refused=tuple(refused))


def _score(verdicts: Sequence[FeatureVerdict], settings: DriftSettings) -> float | None:
    """The device's score over the features judged in this message: their severity, the
    worst (``max``) or a weighted mean (a feature without a weight weighs 1). > 1: drift.
    (The same reduction as ``stats.device_score``, on severities already computed.)"""
    judged = [v for v in verdicts if v.severity is not None]
    if not judged:
        return None
    severity = np.array([v.severity for v in judged], dtype=np.float64)
    if settings.score.reduction is Reduction.MAX:
        return _number(severity.max())
    weights = np.array([settings.score.weights.get(v.feature, 1.0) for v in judged])
    total = weights.sum()
    return _number(float((severity * weights).sum() / total)) if total > 0 else None
