"""The benchmarks still run end to end (tiny sizes) and end with their JSON figures line.

Not a performance test: figures are printed by the benchmark itself, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_verify_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "verify.py"), "--sizes", "1,3"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"verify_vs_sha256", "rss_mb_1", "rss_mb_3", "download_vs_sha256"} <= set(figures)
    assert figures["verify_vs_sha256"] > 0 and figures["rss_mb_3"] > 0
