"""How far a new model version's outputs are from the previous version's, on the same
devices: the rollout's drift gate.

Each version's windows count its outputs on *its own* baseline's edges, and two builds have
different edges (quantiles of different outputs). So the new version's counts are first
moved onto the previous version's edges (:func:`rebin`: mass spread evenly within each
bin, the usual histogram assumption, then cut at the other edges; underflow, overflow and
missing kept as they are), and the two histograms are compared there with the
Jensen-Shannon distance of :mod:`fleet.drift.stats` (base 2, in [0, 1]). A device's value
is its largest distance over the output features both versions have; features with fewer
than ``min_rows`` values on either side are not judged.

Compared with the previous version's outputs on the same device (not with the new build's
own baseline): a new build's baseline is computed by that build, so a model that answers
differently from its predecessor on the devices' real inputs matches its own baseline and
only shows here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fleet.drift.stats import js_distance

__all__ = ["OUTPUT_PREFIX", "output_shift", "rebin"]

OUTPUT_PREFIX = "output:"


def rebin(counts: Sequence[float], edges: Sequence[float], onto: Sequence[float]
          ) -> np.ndarray:
    """Counts in the k + 3 layout over ``edges``, moved onto the edges ``onto`` (same
    layout, ``len(onto) - 1`` inner bins). Underflow and overflow mass stays outside the
    new range; inner mass falling outside ``onto`` goes to its underflow or overflow."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    onto = np.asarray(onto, dtype=np.float64)
    inner = counts[1:-2]
    cumulative = np.concatenate([[0.0], np.cumsum(inner)])  # mass below each edge
    at = np.interp(onto, edges, cumulative, left=0.0, right=cumulative[-1])
    moved = np.empty(len(onto) + 2)
    moved[0] = counts[0] + at[0]  # underflow: the old underflow and the mass below onto[0]
    moved[1:-2] = np.diff(at)
    moved[-2] = counts[-2] + (cumulative[-1] - at[-1])
    moved[-1] = counts[-1]
    return moved


def output_shift(
    previous: Mapping[str, np.ndarray], previous_edges: Mapping[str, Sequence[float]],
    new: Mapping[str, np.ndarray], new_edges: Mapping[str, Sequence[float]],
    min_rows: int,
) -> tuple[float | None, str | None]:
    """The largest JS distance over the output features both versions counted enough of,
    and that feature; (None, None) when none can be judged yet."""
    worst: tuple[float | None, str | None] = (None, None)
    for feature, before in previous.items():
        if not feature.startswith(OUTPUT_PREFIX):
            continue
        after = new.get(feature)
        if after is None or feature not in previous_edges or feature not in new_edges:
            continue
        if len(before) != len(previous_edges[feature]) + 2 or (
                len(after) != len(new_edges[feature]) + 2):
            continue  # not in the layout of its baseline: left out, as the ingest does
        if before.sum() < min_rows or after.sum() < min_rows:
            continue
        moved = rebin(after, new_edges[feature], previous_edges[feature])
        distance = float(js_distance(before, moved))
        if worst[0] is None or distance > worst[0]:
            worst = (distance, feature)
    return worst
