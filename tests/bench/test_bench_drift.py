"""The drift benchmark still runs end to end (tiny size) and ends with its JSON figures line.

Not a performance test: figures are printed by the benchmark itself, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_drift_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "drift.py"), "--devices", "20", "--features", "3",
         "--bins", "5", "--repeat", "1", "--device-repeat", "50"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"fleet_drift_10k_s", "floor_s", "fleet_vs_floor", "devices", "features",
            "bins"} <= set(figures)
    assert figures["devices"] == 20 and figures["features"] == 3 and figures["bins"] == 5
    assert figures["fleet_drift_10k_s"] > 0 and figures["fleet_vs_floor"] > 0
    assert figures["device_overhead_b256"] >= 0 and figures["device_overhead_us_b1"] >= 0
