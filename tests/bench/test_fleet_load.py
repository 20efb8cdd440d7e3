"""bench/fleet_load.py still runs end to end (50 devices, 5 s measured per phase) and ends
with its JSON figures line, one worker then two, with every heartbeat stored exactly once.

Not a performance test: the lag and CPU figures are printed by the benchmark, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

PHASE_KEYS = {
    "sent", "stored", "lost", "doubled", "ingest_lag_p50_s", "ingest_lag_p99_s",
    "ingest_lag_max_s", "received_lag_p99_s", "worker_cpu_cores", "worker_cpu_cores_each",
    "worker_cpu_per_1k_devices", "pg_cpu_cores", "pg_cpu_per_1k_devices", "broker_cpu_cores",
    "publishers_cpu_cores", "machine_busy_cores",
}


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_fleet_load_benchmark_stores_every_heartbeat_once(postgres_url):
    """Needs PostgreSQL (the postgres_url fixture skips, or fails under CI, without it)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleet_load.py"), "--quick", "--devices", "50",
         "--duration", "5"],
        capture_output=True, text=True, timeout=220,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["devices"] == 50 and figures["duration_s"] == 5
    assert {"one_worker", "two_workers", "two_vs_one"} <= set(figures)
    for phase, workers in (("one_worker", 1), ("two_workers", 2)):
        result = figures[phase]
        assert set(result) >= PHASE_KEYS, phase
        assert result["sent"] > 0 and result["stored"] == result["sent"], (phase, result)
        assert result["lost"] == 0 and result["doubled"] == 0, (phase, result)
        assert len(result["worker_cpu_cores_each"]) == workers
        assert result["ingest_lag_p99_s"] >= result["ingest_lag_p50_s"] > 0
