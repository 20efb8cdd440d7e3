"""Live histograms on a baseline's edges, in the wire layout.

For edges ``e_0 < ... < e_k`` a live histogram has k + 3 counts (``agent.contract``,
:data:`~agent.contract.HISTOGRAM_EXTRA_BINS`): underflow (``x < e_0``), the k inner bins
(``i = searchsorted(edges, x, side="right")``; ``x == e_k`` falls in the last one, as in
``np.histogram``), overflow (``x > e_k``), missing (NaN or infinite). :func:`live_counts`
is that rule written out, the reference the tests and the fleet read.

:class:`BlockBinner` computes the same counts for a block of rows and many features at a
time, and faster: it sorts each feature's values once (numpy's vectorised sort) and
searches the k + 3 boundaries in them, rather than searching every value among the
edges (a binary search per value mispredicts branches: ~15-25 ns a value, against ~5
for sort-then-search on 4,096 rows). The boundaries turn the mixed rule (left-closed
inner bins, a right-closed last bin, infinities as missing) into one left-sided search:
``nextafter`` moves a right-sided boundary to the next float64, below which no float64
lies. Values are float64 (summaries are), so that step is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from agent.contract import HISTOGRAM_EXTRA_BINS

__all__ = ["BlockBinner", "boundaries", "live_counts"]


def live_counts(edges: Sequence[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """The k + 3 counts of ``values`` on ``edges``, straight from the rule (reference)."""
    edges = np.asarray(edges, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).ravel()
    k = len(edges) - 1
    index = np.searchsorted(edges, values, side="right")
    index[values == edges[-1]] = k  # the last inner bin is closed on the right
    index[~np.isfinite(values)] = k + 2  # NaN, +inf and -inf are missing
    return np.bincount(index, minlength=k + HISTOGRAM_EXTRA_BINS)


def boundaries(edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """k + 3 points whose left-sided positions in sorted values split them into the layout:
    position differences are underflow, the inner bins and overflow; what lies outside
    the first and last point (-inf below, NaN and +inf above) is missing."""
    edges = np.asarray(edges, dtype=np.float64)
    return np.concatenate([
        [np.nextafter(-np.inf, 0.0)],  # values below it: exactly -inf
        edges[:-1],
        [np.nextafter(edges[-1], np.inf), np.inf],  # e_k counts inside; +inf and NaN above
    ])


class BlockBinner:
    """Counts blocks of summary rows into one flat vector: each feature's k + 3 counts, one
    feature after the other (``spans[j]`` is feature j's slice)."""

    def __init__(self, edges: Sequence[Sequence[float] | np.ndarray]) -> None:
        self._points = [boundaries(e) for e in edges]
        starts = np.cumsum([0] + [len(p) for p in self._points])
        self.spans = [slice(int(a), int(b)) for a, b in pairwise(starts)]
        self.size = int(starts[-1])

    def count(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Add the counts of ``block`` (features, rows) to ``out`` (new when None) and return
        it. ``block`` is sorted in place: pass a copy you own (summaries are)."""
        if out is None:
            out = np.zeros(self.size, np.int64)
        rows = block.shape[1]
        if rows == 0:
            return out
        block.sort(axis=1)  # NaN last
        for values, points, span in zip(block, self._points, self.spans, strict=True):
            at = np.searchsorted(values, points)
            counts = out[span]
            counts[:-1] += np.diff(at)
            counts[-1] += rows - int(at[-1] - at[0])
        return out
