"""The attack suite: every attack is refused with a named error, and the old model serves on.

Real parts: the fleet's TUF repository on disk, the fleet's HTTP routes under uvicorn, the
device's python-tuf client, real bundles with onnxruntime health checks. The attacker is
simulated by rewriting the repository's files on disk, which is what a compromised mirror
or server can do.
"""

from __future__ import annotations

import shutil
import tarfile
from datetime import timedelta

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from agent.bundle import verify_slot
from agent.contract import BundleRef, utcnow
from agent.errors import RollbackRefusedError
from agent.reconciler import Reconciler
from agent.state import AgentState
from tests.fixtures.bundles import file_member, read_members, relist, write_members
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.trust import make_device_side

V1 = BundleRef(name="detector", version=1)
V2 = BundleRef(name="detector", version=2)


@pytest.fixture
def serving_v1(repo_server, device_side, make_bundle):
    """A device that installed and serves detector v1."""
    repo_server.publish(make_bundle(version=1, seed=0))
    model = device_side.installer.install(V1, None)
    assert model is not None and model.manifest.ref == V1
    return model


def assert_still_serving_v1(device_side, model) -> None:
    slots = device_side.installer.slots
    assert slots.active() == model.slot
    assert verify_slot(slots.path(model.slot)).ref == V1
    outputs = model.engine.infer(np.zeros((1, 4), np.float32))
    assert outputs["y"].shape == (1, 3)


def refused(device_side, model, reason: str, *, match: str = "") -> dict:
    result = device_side.installer.install(V2, model)
    assert result is None, "the attack must not install anything"
    failure = device_side.failures()[-1]
    assert failure["reason"] == reason, failure
    assert match in failure["detail"], failure
    assert_still_serving_v1(device_side, model)
    return failure


def test_bit_flipped_bundle_is_refused(repo_server, device_side, serving_v1, make_bundle):
    built = make_bundle(version=2, seed=1)
    repo_server.publish(built)
    target = repo_server.target_file("detector-2.bundle")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    refused(device_side, serving_v1, "hash_mismatch", match="does not match the signed")


def test_bundle_signed_by_an_unknown_key_is_refused(
    repo_server, device_side, serving_v1, make_bundle, tmp_path
):
    """The attacker holds snapshot+timestamp keys but not targets: signs targets itself."""
    repo = repo_server.repository
    built = make_bundle(version=2, seed=1)
    shutil.copy(built.path, repo.targets_dir / f"{built.sha256}.detector-2.bundle")
    targets = repo.targets().signed
    targets.targets["detector-2.bundle"] = TargetFile.from_file(
        "detector-2.bundle", str(built.path), ["sha256"]
    )
    targets.version += 1
    forged = Metadata(targets)
    forged.sign(CryptoSigner.generate_ed25519())
    (repo.metadata_dir / f"{targets.version}.targets.json").write_bytes(forged.to_bytes())
    snapshot = repo.snapshot().signed
    snapshot.meta["targets.json"] = MetaFile(version=targets.version)
    snapshot.version += 1
    signed = Metadata(snapshot)
    signed.sign(repo.online_signer("snapshot"))
    (repo.metadata_dir / f"{snapshot.version}.snapshot.json").write_bytes(signed.to_bytes())
    timestamp = repo.timestamp().signed
    timestamp.snapshot_meta = MetaFile(version=snapshot.version)
    timestamp.version += 1
    signed = Metadata(timestamp)
    signed.sign(repo.online_signer("timestamp"))
    (repo.metadata_dir / "timestamp.json").write_bytes(signed.to_bytes())
    refused(device_side, serving_v1, "untrusted_metadata", match="UnsignedMetadataError")


def test_replayed_older_metadata_is_refused(repo_server, device_side, serving_v1, make_bundle):
    """Rollback attack: after the device saw newer metadata, the server replays old ones."""
    old_timestamp = (repo_server.repository.metadata_dir / "timestamp.json").read_bytes()
    repo_server.publish(make_bundle(version=2, seed=1))
    device_side.client.refresh()  # the device has now seen the newer timestamp
    (repo_server.repository.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    refused(device_side, serving_v1, "untrusted_metadata", match="BadVersionNumberError")


def test_expired_timestamp_is_refused(repo_server, device_side, serving_v1, make_bundle):
    """Freeze attack: the server keeps serving a timestamp past its expiry."""
    repo = repo_server.repository
    repo_server.publish(make_bundle(version=2, seed=1))
    timestamp = repo.timestamp().signed
    timestamp.expires = utcnow() - timedelta(hours=1)
    timestamp.version += 1
    signed = Metadata(timestamp)
    signed.sign(repo.online_signer("timestamp"))
    (repo.metadata_dir / "timestamp.json").write_bytes(signed.to_bytes())
    refused(device_side, serving_v1, "untrusted_metadata", match="ExpiredMetadataError")


def test_mix_and_match_of_metadata_versions_is_refused(
    repo_server, device_side, serving_v1, make_bundle
):
    """The timestamp names snapshot N; the server hands out an older snapshot under N."""
    repo = repo_server.repository
    previous = repo.timestamp().signed.snapshot_meta.version
    repo_server.publish(make_bundle(version=2, seed=1))
    current = repo.timestamp().signed.snapshot_meta.version
    shutil.copy(
        repo.metadata_dir / f"{previous}.snapshot.json",
        repo.metadata_dir / f"{current}.snapshot.json",
    )
    refused(device_side, serving_v1, "untrusted_metadata", match="BadVersionNumberError")


def test_target_longer_than_its_signed_length_is_cut_off(
    repo_server, device_side, serving_v1, make_bundle
):
    """Endless data: the server keeps sending after the signed length."""
    repo_server.publish(make_bundle(version=2, seed=1))
    target = repo_server.target_file("detector-2.bundle")
    with open(target, "ab") as grown:
        grown.write(b"\0" * 5_000_000)
    refused(device_side, serving_v1, "hash_mismatch", match="more than the signed")


@pytest.mark.parametrize(
    "evil",
    [
        file_member("../escape.txt", b"x"),
        file_member("/tmp/absolute.txt", b"x"),
        "symlink",
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_signed_bundle_with_an_unsafe_archive_is_refused(
    repo_server, device_side, serving_v1, make_bundle, tmp_path, evil
):

    members = read_members(make_bundle(version=2, seed=1).path)
    if evil == "symlink":
        link = tarfile.TarInfo("model.onnx")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        members = [members[0], (link, b""), *members[2:]]
    else:
        members = [*members, evil]
    bad = write_members(tmp_path / "evil.bundle", members)
    repo_server.publish_raw(bad, "detector-2.bundle")  # validly signed, maliciously built
    refused(device_side, serving_v1, "unsafe_archive")
    assert not (device_side.state_dir / "escape.txt").exists()


def test_bundle_over_the_size_limit_is_refused_before_download(
    repo_server, tmp_path, make_bundle
):
    built = make_bundle(version=1, seed=0)
    repo_server.publish(built)
    device = make_device_side(tmp_path / "small", repo_server.url, max_bundle_bytes=built.size - 1)
    assert device.installer.install(V1, None) is None
    assert device.failures()[-1]["reason"] == "too_large"
    assert repo_server.faults.target_requests() == [], "nothing may be downloaded"


def test_root_rotation_signed_below_threshold_is_refused(tmp_path, repo_server, make_bundle):
    repo = repo_server.repository
    # start over with a 2-of-2 root
    shutil.rmtree(repo.data_dir / "keys")
    shutil.rmtree(repo.metadata_dir)
    repo.init(root_keys=2, root_threshold=2)
    device = make_device_side(tmp_path / "dev", repo_server.url)
    repo_server.publish(make_bundle(version=1, seed=0))
    model = device.installer.install(V1, None)
    assert model is not None

    old_signers = repo.root_signers()
    root = repo.root().signed
    root.version += 1
    attacker = CryptoSigner.generate_ed25519()
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(attacker.public_key, "root")
    root.roles["root"].threshold = 1
    repo.write_root(root, [old_signers[0], attacker])  # only 1 of the 2 old root keys
    repo_server.publish(make_bundle(version=2, seed=1))

    assert device.installer.install(V2, model) is None
    failure = device.failures()[-1]
    assert failure["reason"] == "untrusted_metadata"
    assert "UnsignedMetadataError" in failure["detail"]
    assert_still_serving_v1(device, model)


def test_proper_root_rotation_is_followed(repo_server, device_side, serving_v1, make_bundle):
    version = repo_server.repository.rotate("root")
    repo_server.repository.rotate("director")
    repo_server.publish(make_bundle(version=2, seed=1))
    installed = device_side.installer.install(V2, serving_v1)
    assert installed is not None and installed.manifest.ref == V2
    trusted = Metadata.from_file(str(device_side.state_dir / "tuf" / "root.json"))
    assert trusted.signed.version == version + 1
    keys = device_side.client.director_keys()
    assert set(keys.keys) == {repo_server.repository.online_signer("director").public_key.keyid}


def test_model_failing_its_health_check_is_refused(
    repo_server, device_side, serving_v1, make_bundle, tmp_path
):
    members = read_members(make_bundle(version=2, seed=1).path)
    other = tmp_path / "other.onnx"
    build_mlp_onnx(other, seed=7)
    members[1] = (members[1][0], other.read_bytes())
    bad = write_members(tmp_path / "unhealthy.bundle", relist(members))
    repo_server.publish_raw(bad, "detector-2.bundle")
    refused(device_side, serving_v1, "health_check_failed", match="differs")


def test_download_resumes_after_a_dropped_connection(
    repo_server, device_side, make_bundle, tmp_path
):
    """Boundary bent: NetworkFaults cuts the first response after 3000 bytes."""
    built = make_bundle(version=1, seed=0)
    repo_server.publish(built)
    repo_server.faults.cut_after = 3000
    model = device_side.installer.install(V1, None)
    assert model is not None
    ranges = [r for _, r in repo_server.faults.target_requests()]
    assert ranges[0] is None
    assert ranges[1] is not None and ranges[1].startswith("bytes=")
    resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 3000


def test_rollback_switches_to_the_previous_slot_once(
    repo_server, device_side, serving_v1, make_bundle
):
    repo_server.publish(make_bundle(version=2, seed=1))
    v2 = device_side.installer.install(V2, serving_v1)
    assert v2 is not None and device_side.installer.slots.active() == v2.slot
    swapped = []
    state = AgentState(device_side.state_dir)
    reconciler = Reconciler(
        state, device_side.installer, emit=lambda name, **d: device_side.events.append((name, d)),
        current=lambda: v2, on_swap=swapped.append,
    )

    record = reconciler.rollback()

    assert (record.from_ref, record.to_ref, record.slot) == (V2, V1, serving_v1.slot)
    assert device_side.installer.slots.active() == serving_v1.slot
    assert [m.manifest.ref for m in swapped] == [V1]
    assert device_side.events[-1] == (
        "rolled_back",
        {"from": {"name": "detector", "version": 2}, "to": {"name": "detector", "version": 1},
         "slot": serving_v1.slot, "by": "edge-agent rollback"},
    )
    with pytest.raises(RollbackRefusedError, match="would go forward to detector v2"):
        reconciler.rollback()
    assert device_side.installer.slots.active() == serving_v1.slot
    swapped[0].engine.close()
    state.close()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # truncated: not a zip any more
        lambda data: data[:200] + bytes([data[200] ^ 0x01]) + data[201:],  # bad CRC-32
        lambda data: b"\0" * len(data),  # numpy's pickle guess
    ],
    ids=["truncated", "bit_flip", "zeros"],
)
def test_bundle_with_corrupt_samples_fails_once_as_final(
    repo_server, device_side, serving_v1, make_bundle, tmp_path, corrupt
):
    """Validly signed and listed, but samples.npz is not a readable npz: one ``failed``
    event naming the file, final (the same bytes fail again), and v1 serves on."""
    members = read_members(make_bundle(version=2, seed=1).path)
    index = next(i for i, (info, _) in enumerate(members) if info.name == "samples.npz")
    members[index] = (members[index][0], corrupt(members[index][1]))
    bad = write_members(tmp_path / "corrupt-samples.bundle", relist(members))
    repo_server.publish_raw(bad, "detector-2.bundle")

    failure = refused(device_side, serving_v1, "health_check_failed", match="samples.npz")

    assert device_side.failures() == [failure], "exactly one failed event"
    assert device_side.installer.last_error is not None
    assert device_side.installer.last_error.final
