"""Drift tracking on the device: what of each request is summarised, and how it is counted.

``summaries`` reduces each tensor's rows to named scalar features (the same code runs at
bundle build for the baseline and on the device for live windows); ``bins`` counts values
on a baseline's edges in the wire layout; ``plan`` matches a bundle's baseline to its
tensors; ``window`` observes requests and closes windows. Nothing here does IO beyond
reading ``baseline.json``: publishing windows is the daemon's.
"""

from agent.drift.bins import BlockBinner, boundaries, live_counts
from agent.drift.plan import (
    BaselineError,
    DriftPlan,
    TrackedTensor,
    load_baseline,
    load_drift_plan,
    plan_drift,
)
from agent.drift.summaries import (
    SummaryError,
    feature_names,
    fixed_edges,
    has_batch_axis,
    summarise,
    summary_for,
)
from agent.drift.window import DriftWindow, WindowReport

__all__ = [
    "BaselineError",
    "BlockBinner",
    "DriftPlan",
    "DriftWindow",
    "SummaryError",
    "TrackedTensor",
    "WindowReport",
    "boundaries",
    "feature_names",
    "fixed_edges",
    "has_batch_axis",
    "live_counts",
    "load_baseline",
    "load_drift_plan",
    "plan_drift",
    "summarise",
    "summary_for",
]
