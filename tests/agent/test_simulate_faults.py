"""The simulator's fault file: merged over the flags, re-read on change, refused whole."""

from __future__ import annotations

import json
import os

import pytest

from agent.simulate.faults import DeviceFaults, FaultWatch, parse_fault_file
from agent.simulate.runner import device_ids


def _write(path, content: dict | str, bump: int) -> None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    stat = path.stat()  # a distinct mtime even within the file system's time resolution
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 10**9))


def test_faults_are_flags_then_defaults_then_the_device_entry(tmp_path):
    path = tmp_path / "faults.json"
    _write(path, {"defaults": {"latency_ms": 5},
                  "devices": {"sim-0002": {"latency_ms": 40, "offline": True,
                                           "labels": {"ring": "canary"}}}}, 1)
    watch = FaultWatch(path, DeviceFaults(error_rate=0.1))
    assert watch.poll()
    assert watch.faults_for("sim-0001") == DeviceFaults(error_rate=0.1, latency_ms=5)
    assert watch.faults_for("sim-0002") == DeviceFaults(
        error_rate=0.1, latency_ms=40, offline=True, labels={"ring": "canary"})
    assert not watch.poll()  # unchanged: not re-read


def test_a_bad_fault_file_is_refused_whole_and_the_faults_in_force_stay(tmp_path, caplog):
    path = tmp_path / "faults.json"
    _write(path, {"devices": {"sim-0001": {"fail_health_check": True}}}, 1)
    watch = FaultWatch(path, DeviceFaults())
    assert watch.poll()
    _write(path, {"devices": {"sim-0001": {"fail_healthcheck": True}}}, 2)
    assert not watch.poll()
    assert "fail_healthcheck" in caplog.text
    assert watch.faults_for("sim-0001").fail_health_check
    path.unlink()
    assert watch.poll() and not watch.faults_for("sim-0001").fail_health_check


@pytest.mark.parametrize(("content", "says"), [
    ('{"devices": {"a": {"error_rate": 1.5}}}', "error_rate"),
    ('{"devices": {"a": {"latency_ms": -1}}}', "latency_ms"),
    ('{"devices": {"a": {"labels": {"Ring": "x"}}}}', "label key 'Ring'"),
    ("{nope", "not JSON"),
])
def test_fault_file_errors_name_the_field(content, says):
    with pytest.raises(ValueError, match=says):
        parse_fault_file(content.encode())


def test_device_ids_are_zero_padded_to_sort_as_numbered():
    assert device_ids("sim-", 3) == ["sim-0001", "sim-0002", "sim-0003"]
    assert device_ids("d", 12000)[-1] == "d12000"


def test_entries_with_only_versions_apply_to_those_bundle_versions_only(tmp_path):
    path = tmp_path / "faults.json"
    _write(path, {"defaults": {"latency_ms": 5},
                  "devices": {"sim-0001": [
                      {"fail_health_check": True, "only_versions": [3]},
                      {"latency_ms": 10, "client_error_rate": 0.5, "only_versions": [4, 5]},
                  ]}}, 1)
    watch = FaultWatch(path, DeviceFaults())
    assert watch.poll()
    assert watch.faults_for("sim-0001", None) == DeviceFaults(latency_ms=5)
    assert watch.faults_for("sim-0001", 2) == DeviceFaults(latency_ms=5)
    assert watch.faults_for("sim-0001", 3) == DeviceFaults(latency_ms=5, fail_health_check=True)
    assert watch.faults_for("sim-0001", 5) == DeviceFaults(latency_ms=10, client_error_rate=0.5)
    assert watch.faults_for("sim-0002", 3) == DeviceFaults(latency_ms=5)


def test_a_version_list_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="only_versions"):
        parse_fault_file(b'{"devices": {"a": {"only_versions": [0]}}}')
