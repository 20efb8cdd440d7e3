"""edgefleet fleet service: registry, rollouts, telemetry ingest and drift tracking."""

from agent import __version__

__all__ = ["__version__"]
