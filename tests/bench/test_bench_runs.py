"""The benchmarks still run end to end (tiny sizes) and end with their JSON figures line.

Not a performance test: figures are printed by the benchmark itself, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_infer_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "infer.py"), "--seconds", "0.05"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"engine_vs_bare_b256", "endpoint_vs_bare_b1", "idle_rss_mb",
            "endpoint_vs_asyncio_floor_b1", "endpoint_vs_fastapi_b1", "vad_npz_vs_json",
            "npz_read_vs_np_load"} <= set(figures)
    assert figures["idle_rss_mb"] > 0
    assert figures["endpoint_vs_asyncio_floor_b1"] > 0 and figures["endpoint_vs_fastapi_b1"] > 0


@pytest.mark.postgres
def test_ingest_benchmark_prints_its_figures_as_json(postgres_url):
    """Needs PostgreSQL (the postgres_url fixture skips, or fails under CI, without it)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "ingest.py"), "--messages", "300", "--devices", "10",
         "--no-long", "--repeat", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"ingest_vs_bare", "two_workers_vs_one", "msgs_per_s", "worker_rss_mb"} <= set(figures)
    assert figures["msgs_per_s"] > 0


def test_simulate_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "simulate.py"), "--devices", "3", "--interval", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"register_s", "deploy_s", "rss_mb_per_device_idle",
            "rss_mb_per_device_serving"} <= set(figures)
    assert figures["healthy_events"] == 3 and figures["tracebacks"] == 0
    assert figures["simulator_exit"] == 0


def test_fanout_benchmark_prints_its_figures_as_json():
    done = subprocess.run(
        [sys.executable, str(BENCH / "fanout.py"), "--devices", "50", "--sim-devices", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"floor_per_s", "desired_per_s", "fanout_vs_floor", "gate_eval_10k_s"} <= set(figures)
    assert figures["devices"] == 50 and figures["desired_per_s"] > 0
    assert figures["sim_devices"] == 2 and figures["sim_rss_mb_per_device_serving"] > 0
