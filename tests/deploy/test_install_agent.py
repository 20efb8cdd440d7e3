"""``deploy/systemd/edge-agent.service`` and ``deploy/install-agent.sh``'s refusals.

The unit is checked by systemd itself (``systemd-analyze verify``: unknown keys, bad values,
an ExecStart that does not exist); the full install runs in tests/e2e/test_install.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "systemd" / "edge-agent.service"
SCRIPT = DEPLOY / "install-agent.sh"


def systemd_analyze() -> str:
    """The systemd-analyze binary; the test is skipped without one (failed under CI=true)."""
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None)
    if found is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def verify_unit(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


def _settings(unit_text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    # verify checks that ExecStart exists: the same unit, pointed at an executable here.
    text = UNIT.read_text().replace("/opt/edgefleet/venv/bin/edge-agent", sys.executable)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text)
    done = verify_unit(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warned about


def test_systemd_analyze_verify_catches_a_misspelt_key(tmp_path):
    """Not vacuous: the check above would see a mistake."""
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgefleet/venv/bin/edge-agent",
                                             sys.executable).replace("WatchdogSec", "WatchdogSex"))
    assert "Unknown key" in verify_unit(unit).stderr


def test_the_unit_says_what_the_device_relies_on():
    settings = _settings(UNIT.read_text())
    expected = {
        "Type": ["notify"], "User": ["edgefleet"], "Restart": ["on-failure"],
        "RestartSec": ["5"], "WatchdogSec": ["60"], "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"], "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
        "ReadWritePaths": ["/var/lib/edgefleet"], "StateDirectory": ["edgefleet"],
        "MemoryMax": ["512M"],
        "ExecStart": ["/opt/edgefleet/venv/bin/edge-agent --config /etc/edgefleet/agent.toml run"],
    }
    assert {key: settings.get(key) for key in expected} == expected


def test_the_units_sandbox_is_rated_low_exposure(tmp_path):
    text = UNIT.read_text().replace("/opt/edgefleet/venv/bin/edge-agent", sys.executable)
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text)
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr and done.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout  # 0 = fully sandboxed, 10 = none


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("args", "says"), [
    (["--bogus"], "unknown argument: --bogus"),
    (["--fleet", "http://fleet:8000"], "--fleet and --code go together"),
    (["--code", "EF1-X"], "--fleet and --code go together"),
    (["--fleet", "fleet:8000", "--code", "EF1-X"], "expected http://HOST:PORT"),
    (["--extra", "fleet"], "the only optional extra is tflite"),
    (["--source", "/nonexistent/x.whl"], "not a source tree or a .whl file"),
    (["--root"], "--root needs a value"),
])
def test_bad_arguments_exit_2_naming_the_argument(args, says, tmp_path):
    done = _install("--root", str(tmp_path / "root"), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr
    assert not (tmp_path / "root" / "opt").exists()  # nothing was installed


def test_a_root_path_that_cannot_be_written_into_a_unit_is_refused(tmp_path):
    done = _install("--root", str(tmp_path / "with space"))
    assert done.returncode == 2
    assert "use letters, digits" in done.stderr


def test_help_describes_every_option():
    done = _install("--help")
    assert done.returncode == 0
    for option in ("--fleet", "--code", "--source", "--extra", "--system-site-packages",
                   "--pip-args", "--python", "--root"):
        assert option in done.stdout, option
    assert "Exit codes: 0" in done.stdout
