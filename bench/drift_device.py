"""Benchmark: what drift tracking costs the device's request path, against the inference.

A small tabular model (64 features -> 256 -> 16 classes, the model of ``bench/infer.py``)
is built with its bundle and baseline by the fleet's builder, unpacked as the agent does,
and served by the real onnxruntime engine in a loop: every request is ``Engine.infer``
then ``DriftWindow.observe`` on the same thread, the two timed apart, so the observe runs
with the caches as the inference leaves them (as it will in the endpoint). Each case is
first run for longer than the sampler's rate period, so the stride is the steady one a
device serving this load would have.

Figures:

* ``device_overhead_b256``: observe time / inference time at batch 256. Goal <= 0.03.
* ``device_overhead_us_b1``: mean microseconds per batch-1 observe, block binning and the
  sampler included (amortised). Goal <= 2.
* ``..._all_rows``: the same with every row binned (``sample_rate=None``): what the
  sampler saves, and what a device below the sampling rate pays per row.
* ``infer_us_b1``, ``infer_us_b256``: the engine's mean time per request.

The last line is one JSON object with the figures.

    python bench/drift_device.py                 # default
    python bench/drift_device.py --repeat 200    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES, HIDDEN, OUTPUTS = 64, 256, 16


def _timer_floor() -> float:
    """Nanoseconds two back-to-back perf_counter_ns calls read: taken off each observe."""
    gaps = []
    for _ in range(2000):
        start = time.perf_counter_ns()
        gaps.append(time.perf_counter_ns() - start)
    return float(np.median(gaps))


def _serve(engine, window, batch: np.ndarray, repeat: int, warmup_s: float
           ) -> tuple[float, float]:
    """Mean ns per request of (inference, observe) over ``repeat`` timed requests."""
    clock = time.perf_counter_ns
    inputs = {"x": batch}
    until = time.monotonic() + warmup_s
    while time.monotonic() < until:
        window.observe(inputs, engine.infer(batch))
    infer_ns = observe_ns = 0
    for _ in range(repeat):
        start = clock()
        outputs = engine.infer(batch)
        middle = clock()
        window.observe(inputs, outputs)
        end = clock()
        infer_ns += middle - start
        observe_ns += end - middle
    return infer_ns / repeat, observe_ns / repeat


def measure(repeat: int = 3000, warmup_s: float = 1.2) -> dict:
    """Run the four cases (batch 1 and 256, sampled and every row) and return the figures."""
    from agent.bundle import extract_bundle
    from agent.drift import DriftWindow, load_drift_plan
    from agent.runtime import load_engine
    from fleet.bundle_build import build_bundle
    from tests.fixtures.models import build_mlp_onnx

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_mlp_onnx(work / "mlp.onnx", features=FEATURES, hidden=HIDDEN, outputs=OUTPUTS)
        np.save(work / "train.npy", rng.standard_normal((5000, FEATURES)).astype(np.float32))
        built = build_bundle(work / "mlp.onnx", name="bench", version=1, out_dir=work,
                             baseline=work / "train.npy")
        manifest = extract_bundle(built.path, work / "slot", 1 << 30)
        plan = load_drift_plan(work / "slot", manifest)
        assert plan is not None
        floor = _timer_floor()
        figures: dict[str, float] = {"features": len(plan.features)}
        with load_engine(work / "slot" / manifest.model_file) as engine:
            for rows in (1, 256):
                batch = rng.standard_normal((rows, FEATURES)).astype(np.float32)
                for label, rate in (("", "default"), ("_all_rows", None)):
                    window = (DriftWindow(plan) if rate == "default"
                              else DriftWindow(plan, sample_rate=None))
                    infer_ns, observe_ns = _serve(engine, window, batch, repeat, warmup_s)
                    observe_ns = max(0.0, observe_ns - floor)
                    if rows == 1:
                        figures[f"device_overhead_us_b1{label}"] = round(observe_ns / 1e3, 3)
                    else:
                        figures[f"device_overhead_b256{label}"] = round(
                            observe_ns / infer_ns, 4)
                    figures.setdefault(f"infer_us_b{rows}", round(infer_ns / 1e3, 2))
                    window.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3000, help="timed requests per case")
    parser.add_argument("--warmup", type=float, default=1.2,
                        help="seconds served before timing (the sampler settles in 1 s)")
    args = parser.parse_args()
    figures = measure(args.repeat, args.warmup)
    print(f"model {FEATURES} -> {HIDDEN} -> {OUTPUTS}, {figures['features']:.0f} drift "
          "features (64 inputs, class and top score)")
    print(f"batch 1:   inference {figures['infer_us_b1']} us, observe "
          f"{figures['device_overhead_us_b1']} us (every row binned: "
          f"{figures['device_overhead_us_b1_all_rows']} us)  goal <= 2 us")
    print(f"batch 256: inference {figures['infer_us_b256']} us, observe / inference "
          f"{figures['device_overhead_b256']:.2%} (every row binned: "
          f"{figures['device_overhead_b256_all_rows']:.2%})  goal <= 3%")
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
