"""``edge-fleet bundle build`` and ``edge-fleet keys`` as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np

from fleet.bundle_build import manifest_json
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.processes import console_script


def _fleet(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([*console_script("edge-fleet"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_bundle_build_writes_manifest_samples_and_baseline(tmp_path):
    build_mlp_onnx(tmp_path / "m.onnx")
    np.save(tmp_path / "train.npy", np.random.default_rng(1).normal(size=(300, 4)))
    np.save(tmp_path / "samples.npy", np.ones((3, 4), np.float32))
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "m.onnx"), "--name", "cam",
                  "--version", "7", "--baseline", str(tmp_path / "train.npy"),
                  "--samples", str(tmp_path / "samples.npy"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    path = tmp_path / "out" / "cam-7.bundle"
    assert str(path) in done.stdout and "sha256" in done.stdout
    manifest = manifest_json(path, 1 << 20)
    assert (manifest["name"], manifest["version"], manifest["runtime"]) == ("cam", 7, "onnx")
    assert manifest["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 4], "allow_nan": False}
    ]
    assert set(manifest["files"]) == {"model.onnx", "samples.npz", "baseline.json"}


def test_bundle_build_refuses_a_baseline_of_the_wrong_width(tmp_path):
    build_mlp_onnx(tmp_path / "m.onnx")
    np.save(tmp_path / "train.npy", np.zeros((10, 5)))
    done = _fleet(tmp_path, "bundle", "build", str(tmp_path / "m.onnx"), "--name", "cam",
                  "--version", "1", "--baseline", str(tmp_path / "train.npy"))
    assert done.returncode == 2
    assert "expected shape (rows, 4), given (10, 5)" in done.stderr
    assert "Traceback" not in done.stderr


def test_keys_init_and_rotate(tmp_path):
    done = _fleet(tmp_path, "keys", "init", "--root-keys", "3", "--root-threshold", "2")
    assert done.returncode == 0, done.stderr
    assert "move these offline" in done.stdout
    keys = tmp_path / "data" / "keys"
    assert len(list((keys / "root").glob("root-*.pem"))) == 3
    assert oct((keys / "online" / "director.pem").stat().st_mode & 0o777) == "0o600"
    again = _fleet(tmp_path, "keys", "init")
    assert again.returncode == 2 and "already exists" in again.stderr

    rotated = _fleet(tmp_path, "keys", "rotate", "timestamp")
    assert rotated.returncode == 0 and "root is now version 2" in rotated.stdout
    root = json.loads((tmp_path / "data" / "repo" / "metadata" / "2.root.json").read_text())
    assert len(root["signatures"]) == 3 and root["signed"]["roles"]["root"]["threshold"] == 2


def test_bundle_build_takes_a_summary_per_tensor_and_refuses_a_bad_one(tmp_path):
    import tarfile

    build_mlp_onnx(tmp_path / "m.onnx")
    np.save(tmp_path / "train.npy", np.random.default_rng(1).normal(size=(300, 4)))
    base = ("bundle", "build", str(tmp_path / "m.onnx"), "--name", "cam", "--version", "2",
            "--baseline", str(tmp_path / "train.npy"), "--out", str(tmp_path / "out"))
    done = _fleet(tmp_path, *base, "--summary", "x=stats", "--summary", "y=none")
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "out" / "cam-2.bundle") as bundle:
        baseline = json.load(bundle.extractfile("baseline.json"))
    assert [f["feature"] for f in baseline["features"]] == ["x:mean", "x:std", "x:min", "x:max"]
    refused = _fleet(tmp_path, *base, "--summary", "x=picture")
    assert refused.returncode == 2 and "--summary 'x=picture'" in refused.stderr
