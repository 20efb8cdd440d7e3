"""``bench/drift_device.py`` still runs end to end (tiny sizes) and ends with its JSON line.

Not a performance test: the figures are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_drift_device_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "drift_device.py"), "--repeat", "20", "--warmup", "0.02"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"device_overhead_b256", "device_overhead_us_b1", "device_overhead_b256_all_rows",
            "device_overhead_us_b1_all_rows", "infer_us_b1", "infer_us_b256"} <= set(figures)
    assert figures["infer_us_b256"] > 0 and figures["features"] == 66
