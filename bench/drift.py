"""Benchmark: the fleet's drift statistics over a whole fleet's windows at once.

In one run, on random counts in the k + 3 live layout (devices x features x bins):

* ``fleet_drift_10k_s``: ``fleet.drift.drift_stats`` (input checks, PSI, Jensen-Shannon,
  Wasserstein, missing-rate delta) plus ``device_score`` over every device; goal for
  10,000 devices x 32 features x 20 bins: < 1 s on the 2-core machine;
* ``floor_s``: the bare numpy floor, one elementwise ``sum(p * log(p / q))`` over the same
  arrays already normalised (the least any one statistic costs); ``fleet_vs_floor`` is
  the ratio (all four statistics, checked, against one unchecked one);
* ``device_overhead_b256`` / ``device_overhead_us_b1``: what keeping the live histograms
  costs the device, from ``bench/drift_device.py`` (``--device-repeat``; 0 leaves it out).

Each figure is the best of ``--repeat`` runs. Last line: one JSON object.

    python bench/drift.py                       # 10,000 devices x 32 features x 20 bins
    python bench/drift.py --devices 50 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def device_overhead(repeat: int) -> dict[str, float]:
    """The agent side's cost of keeping the histograms, measured on the device's code
    (``bench/drift_device.py``: the real engine and ``agent.drift.DriftWindow``):
    ``device_overhead_b256`` (observe over inference, batch 256; goal <= 0.03) and
    ``device_overhead_us_b1`` (microseconds per single-row request; goal <= 2)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from drift_device import measure as measure_device

    return measure_device(repeat=repeat)


def fleet_inputs(devices: int, features: int, bins: int, seed: int = 14):
    """Baseline (features, k + 3), live (devices, features, k + 3), edges (features, k + 1).

    Live counts are random (a window of a few hundred to a few thousand rows, some mass in
    every extra column); the statistics' cost does not depend on the values.
    """
    from fleet.drift import baseline_layout

    rng = np.random.default_rng(seed)
    baseline = baseline_layout(rng.integers(1_000, 3_000, (features, bins)))
    live = rng.integers(0, 200, (devices, features, bins + 3)).astype(np.float64)
    edges = np.cumsum(rng.random((features, bins + 1)) + 0.01, axis=-1)
    return baseline, live, edges


def best_of(repeat: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def measure(devices: int, features: int, bins: int, repeat: int) -> dict[str, float]:
    from fleet.drift import device_score, drift_stats

    baseline, live, edges = fleet_inputs(devices, features, bins)
    names = [f"x{index}" for index in range(features)]

    def fleet() -> None:
        stats = drift_stats(baseline, live, edges)
        device_score(stats, names)

    smoothed = baseline + 1  # no empty bin: the floor measures arithmetic, not warnings
    p = np.broadcast_to(smoothed / smoothed.sum(axis=-1, keepdims=True), live.shape)
    q = (live + 1) / (live + 1).sum(axis=-1, keepdims=True)

    def floor() -> None:
        (p * np.log(p / q)).sum(axis=-1)

    fleet()  # warm up (imports, first allocations)
    fleet_s = best_of(repeat, fleet)
    floor_s = best_of(repeat, floor)
    return {"fleet_s": fleet_s, "floor_s": floor_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--bins", type=int, default=20, help="inner bins (k) per feature")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best kept)")
    parser.add_argument("--device-repeat", type=int, default=3000,
                        help="timed requests per device-side case (0: leave them out)")
    args = parser.parse_args()

    measured = measure(args.devices, args.features, args.bins, max(1, args.repeat))
    histograms = args.devices * args.features
    print(f"{args.devices} devices x {args.features} features x {args.bins} bins "
          f"({histograms:,} histograms of {args.bins + 3} counts)")
    print(f"  fleet (every statistic + device score): {measured['fleet_s'] * 1000:8.1f} ms"
          f"  ({histograms / measured['fleet_s'] / 1e6:.2f} M histograms/s)")
    print(f"  numpy floor (one sum p*log(p/q)):        {measured['floor_s'] * 1000:8.1f} ms")
    print(f"  fleet_vs_floor: {measured['fleet_s'] / measured['floor_s']:.1f}")
    figures: dict[str, float | int] = {
        "devices": args.devices,
        "features": args.features,
        "bins": args.bins,
        # named for the goal's size; at other sizes it is the time for the size given
        "fleet_drift_10k_s": round(measured["fleet_s"], 4),
        "floor_s": round(measured["floor_s"], 4),
        "fleet_vs_floor": round(measured["fleet_s"] / measured["floor_s"], 2),
    }
    if args.device_repeat:
        device = device_overhead(args.device_repeat)
        print(f"  device: {device['device_overhead_b256']:.4f} of a batch-256 inference, "
              f"{device['device_overhead_us_b1']:.2f} us per batch-1 request")
        device["device_features"] = device.pop("features")  # the device model's, not ours
        figures.update(device)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
