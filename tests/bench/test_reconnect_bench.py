"""bench/reconnect.py still runs end to end (30 devices, keepalive 3 s, so the jittered
storm spreads over 3 s) and ends with its JSON figures line. Structure only: the figures
are the benchmark's to print, not this test's to judge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_reconnect_benchmark_prints_both_storms_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "reconnect.py"), "--devices", "30", "--keepalive", "3",
         "--interval", "1", "--timeout", "120"],
        capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["devices"] == 30 and isinstance(figures["goal_met"], bool)
    for run in ("jitter_on", "jitter_off"):
        storm = figures[run]
        assert {"all_online_s", "peak_connects_per_s", "peak_share", "connects"} <= set(storm)
        assert storm["all_online_s"] is not None  # every device came back
        assert 1 <= storm["peak_connects_per_s"] <= storm["connects"]
        assert storm["simulator_exit"] == 0 and storm["tracebacks"] == 0
