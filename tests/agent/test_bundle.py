"""Bundles: built from a real ONNX model, unpacked safely, health-checked with onnxruntime.

Tampered archives are written by hand with ``tarfile`` (that is the attacker's tool too).
"""

from __future__ import annotations

import json
import tarfile

import msgspec
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.bundle import COMPLETE_MARKER, extract_bundle, verify_slot
from agent.errors import (
    BundleTooLargeError,
    HealthCheckError,
    LengthOrHashMismatchError,
    ManifestError,
    UnsafeArchiveError,
)
from agent.health import open_checked_engine
from agent.runtime import EngineError
from tests.fixtures.bundles import file_member, read_members, relist, write_members
from tests.fixtures.models import IR_VERSION, OPSET, build_mlp_onnx

LIMIT = 50 * 1024 * 1024


def test_built_bundle_unpacks_verifies_and_passes_its_health_check(make_bundle, tmp_path):
    built = make_bundle(version=3)
    assert built.path.name == "detector-3.bundle"
    manifest = extract_bundle(built.path, tmp_path / "slot", LIMIT)
    assert manifest == built.manifest
    assert manifest.runtime == "onnx" and manifest.inputs[0].shape == [None, 4]
    assert set(manifest.files) == {"model.onnx", "samples.npz", "baseline.json"}
    baseline = json.loads((tmp_path / "slot" / "baseline.json").read_text())
    assert baseline["rows"] == 500
    assert [f["feature"] for f in baseline["features"]] == [
        "x[0]", "x[1]", "x[2]", "x[3]", "output:y.class", "output:y.max"]
    assert sum(baseline["features"][0]["counts"]) == 500
    assert verify_slot(tmp_path / "slot") == manifest
    with open_checked_engine(tmp_path / "slot", manifest) as engine:
        assert engine.infer(np.zeros((2, 4), np.float32))["y"].shape == (2, 3)


def test_bundle_build_is_deterministic_apart_from_its_timestamp(make_bundle):
    first = read_members(make_bundle(version=1).path)
    second = read_members(make_bundle(version=1).path)
    assert [(m.name, d) for m, d in first[1:]] == [(m.name, d) for m, d in second[1:]]


@pytest.mark.parametrize(
    ("evil", "error"),
    [
        (file_member("../escape.txt", b"x"), UnsafeArchiveError),
        (file_member("/etc/evil", b"x"), UnsafeArchiveError),
        (file_member("sub/dir.txt", b"x"), UnsafeArchiveError),
        (file_member("unlisted.bin", b"x"), UnsafeArchiveError),
    ],
    ids=["dotdot", "absolute", "subdir", "unlisted"],
)
def test_archive_with_unsafe_member_is_refused(make_bundle, tmp_path, evil, error):
    members = read_members(make_bundle().path)
    bad = write_members(tmp_path / "bad.bundle", [*members, evil])
    with pytest.raises(error):
        extract_bundle(bad, tmp_path / "slot", LIMIT)
    assert not (tmp_path / "slot" / COMPLETE_MARKER).exists()
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_archive_with_links_or_directories_is_refused(make_bundle, tmp_path, kind):
    members = read_members(make_bundle().path)
    link = tarfile.TarInfo("model.onnx")
    link.type = kind
    link.linkname = "/etc/passwd"
    # the link replaces the model, and the manifest is made to agree as far as it can
    bad = write_members(tmp_path / "bad.bundle", [members[0], (link, b""), *members[2:]])
    with pytest.raises(UnsafeArchiveError, match=r"link|regular file"):
        extract_bundle(bad, tmp_path / "slot", LIMIT)


def test_member_that_does_not_match_its_hash_is_refused(make_bundle, tmp_path):
    members = read_members(make_bundle().path)
    info, data = members[1]
    members[1] = (info, bytes([data[0] ^ 0xFF]) + data[1:])
    bad = write_members(tmp_path / "bad.bundle", members)
    with pytest.raises(LengthOrHashMismatchError, match=r"model\.onnx"):
        extract_bundle(bad, tmp_path / "slot", LIMIT)


def test_bundle_over_the_size_limit_is_refused_before_unpacking(make_bundle, tmp_path):
    built = make_bundle()
    with pytest.raises(BundleTooLargeError, match="limit"):
        extract_bundle(built.path, tmp_path / "slot", max_bytes=1000)
    assert not any((tmp_path / "slot").iterdir())


def test_too_many_files_are_refused(make_bundle, tmp_path):
    members = read_members(make_bundle().path)
    extra = [file_member(f"f{i}.bin", b"x") for i in range(20)]
    with pytest.raises((UnsafeArchiveError, ManifestError)):
        extract_bundle(
            write_members(tmp_path / "bad.bundle", relist([*members, *extra])),
            tmp_path / "slot",
            LIMIT,
        )


def test_manifest_must_come_first(make_bundle, tmp_path):
    members = read_members(make_bundle().path)
    bad = write_members(tmp_path / "bad.bundle", [*members[1:], members[0]])
    with pytest.raises(ManifestError, match="first member"):
        extract_bundle(bad, tmp_path / "slot", LIMIT)


def test_model_that_disagrees_with_its_samples_fails_the_health_check(make_bundle, tmp_path):
    members = read_members(make_bundle(seed=0).path)
    other = tmp_path / "other.onnx"
    build_mlp_onnx(other, seed=1)  # same shapes, different weights
    members[1] = (members[1][0], other.read_bytes())
    bad = write_members(tmp_path / "bad.bundle", relist(members))
    manifest = extract_bundle(bad, tmp_path / "slot", LIMIT)
    with pytest.raises(HealthCheckError, match="differs from the expected samples"):
        open_checked_engine(tmp_path / "slot", manifest)


def test_model_that_does_not_load_fails_the_health_check(make_bundle, tmp_path):
    members = read_members(make_bundle().path)
    members[1] = (members[1][0], b"not an onnx model")
    manifest = extract_bundle(
        write_members(tmp_path / "bad.bundle", relist(members)), tmp_path / "slot", LIMIT
    )
    with pytest.raises(HealthCheckError, match="does not load"):
        open_checked_engine(tmp_path / "slot", manifest)


def test_a_bundle_without_samples_still_runs_once_before_it_serves(make_bundle, tmp_path):
    """No samples to compare with: the model must still run (its warm-up) before serving.
    The model here loads but fails on every input (x reshaped to an impossible size)."""
    fails_on_run = tmp_path / "fails.onnx"
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fails_on_run",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.array([3], np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), fails_on_run)
    manifest = extract_bundle(make_bundle().path, tmp_path / "slot", LIMIT)
    without_samples = msgspec.structs.replace(manifest, health_check=None)
    with open_checked_engine(tmp_path / "slot", without_samples) as engine:
        assert engine.infer(np.zeros((2, 4), np.float32))["y"].shape == (2, 3)

    (tmp_path / "slot" / "model.onnx").write_bytes(fails_on_run.read_bytes())

    with pytest.raises(HealthCheckError, match="failed its warm-up run"):
        open_checked_engine(tmp_path / "slot", without_samples)


def test_no_warm_up_guess_for_a_dynamic_dimension_besides_the_batch(make_bundle, tmp_path):
    """A 3x3 convolution over images of any size: a guessed 1x1 warm-up input would fail,
    yet the model is fine; without samples it is loaded and left to its first request."""
    conv = tmp_path / "conv.onnx"
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "h2", "w2"])],
        initializer=[numpy_helper.from_array(np.ones((1, 3, 3, 3), np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), conv)
    manifest = extract_bundle(make_bundle().path, tmp_path / "slot", LIMIT)
    (tmp_path / "slot" / "model.onnx").write_bytes(conv.read_bytes())
    without_samples = msgspec.structs.replace(manifest, health_check=None)

    with open_checked_engine(tmp_path / "slot", without_samples) as engine:
        with pytest.raises(EngineError):  # what a guessed warm-up would have run into
            engine.warmup()
        assert engine.infer(np.ones((1, 3, 8, 8), np.float32))["y"].shape == (1, 1, 6, 6)


def test_slot_changed_after_install_fails_verification(make_bundle, tmp_path):
    extract_bundle(make_bundle().path, tmp_path / "slot", LIMIT)
    with open(tmp_path / "slot" / "model.onnx", "r+b") as model:
        model.write(b"\0")
    with pytest.raises(LengthOrHashMismatchError, match="changed since"):
        verify_slot(tmp_path / "slot")
