"""The live histogram layout: k + 3 counts, inner bins as np.histogram, the rest where the
contract says; the fast block binner agrees with the rule on any data."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.contract import (
    HISTOGRAM_EXTRA_BINS,
    HISTOGRAM_MISSING,
    HISTOGRAM_OVERFLOW,
    HISTOGRAM_UNDERFLOW,
    MAX_BASELINE_BINS,
    MAX_HISTOGRAM_BINS,
)
from agent.drift.bins import BlockBinner, live_counts


def test_inner_bins_are_np_histogram_and_the_rest_goes_under_over_and_missing():
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    values = np.array([-1.0, 0.0, 0.5, 1.0, 3.9, 4.0, 4.5, np.nan, np.inf, -np.inf, 2.0])
    counts = live_counts(edges, values)
    assert len(counts) == len(edges) - 1 + HISTOGRAM_EXTRA_BINS
    assert counts[HISTOGRAM_UNDERFLOW] == 1  # -1.0
    assert counts[HISTOGRAM_OVERFLOW] == 1  # 4.5
    assert counts[HISTOGRAM_MISSING] == 3  # NaN, +inf, -inf
    inside = values[np.isfinite(values) & (values >= 0) & (values <= 4)]
    np.testing.assert_array_equal(counts[1:HISTOGRAM_OVERFLOW],
                                  np.histogram(inside, bins=edges)[0])
    assert counts[3] == 3  # 2.0, 3.9 and the last edge itself: the last bin is closed


def test_the_largest_baseline_still_fits_a_live_histogram():
    assert MAX_BASELINE_BINS + HISTOGRAM_EXTRA_BINS == MAX_HISTOGRAM_BINS


_values = arrays(np.float64, st.integers(0, 200), elements=st.one_of(
    st.floats(-10, 10), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, -2.5])))
_edges = st.lists(st.floats(-8, 8, allow_subnormal=False), min_size=2, max_size=30,
                  unique=True).map(sorted)


@settings(max_examples=150, deadline=None)
@given(edges=_edges, values=_values)
def test_the_block_binner_counts_what_the_rule_says(edges, values):
    binner = BlockBinner([edges, edges[::-1][::-1]])
    counts = binner.count(np.stack([values, values]))
    reference = live_counts(edges, values)
    for span in binner.spans:
        np.testing.assert_array_equal(counts[span], reference)
    assert reference.sum() == len(values)


def test_blocks_add_up_into_the_same_vector():
    rng = np.random.default_rng(3)
    edges = np.quantile(rng.standard_normal(1000), np.linspace(0, 1, 21))
    values = rng.standard_normal(5000) * 1.5
    binner = BlockBinner([edges])
    out = binner.count(values[:3000].reshape(1, -1).copy())
    binner.count(values[3000:].reshape(1, -1).copy(), out)
    np.testing.assert_array_equal(out, live_counts(edges, values))
