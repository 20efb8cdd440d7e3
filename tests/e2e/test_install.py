"""A device installed by ``deploy/install-agent.sh --root DIR``, run as its systemd unit says.

Real everything: the package is built into a wheel from this tree, installed by the script
into a fresh venv (pip, with the agent's extra only), the unit and config are the ones it
writes, enrollment uses a one-time code from a running ``edge-fleet serve``, and the agent
is started with the unit's own ExecStart line and ``$NOTIFY_SOCKET``, as systemd would.
The install is made once per module (pip takes ~20 s); the tests then run in file order:
layout, a second run that changes nothing, the unit verified, enrollment and the agent.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.local_broker import free_port
from tests.agent.test_sd_notify import NotifySocket
from tests.deploy.test_install_agent import SCRIPT, verify_unit
from tests.fixtures.processes import spawn, start_fleet
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)  # the module's install (pip) runs in the first test


@dataclass
class Installed:
    root: Path
    wheel: Path
    output: str  # the first run's

    @property
    def agent(self) -> Path:
        return self.root / "opt/edgefleet/venv/bin/edge-agent"

    @property
    def config(self) -> Path:
        return self.root / "etc/edgefleet/agent.toml"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/edgefleet"

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system/edge-agent.service"

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_script("--root", str(self.root), "--source", str(self.wheel), *args)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=900, env=_clean_env())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("install")
    # A wheel of this tree: what a release would ship, and stable while the tree changes.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work / "dist"),
         str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((work / "dist").glob("edgefleet-*.whl"))
    done = run_script("--root", str(work / "root"), "--source", str(wheel))
    assert done.returncode == 0, done.stdout + done.stderr
    return Installed(work / "root", wheel, done.stdout)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file under ``root`` with its mode, size and modification time."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def test_an_install_lays_out_the_device(installed):
    lines = installed.output.splitlines()
    assert [line.split()[0] for line in lines] == [
        "user", "venv", "package", "package", "state", "config", "unit", "enroll", "service",
        "done"]
    assert "edge-agent 0.1.0 installed" in installed.output
    assert stat.S_IMODE(installed.state.stat().st_mode) == 0o700
    assert stat.S_IMODE(installed.config.stat().st_mode) == 0o640
    # The agent's extra only: no web framework or ORM on the device.
    venv_python = installed.root / "opt/edgefleet/venv/bin/python"
    probe = subprocess.run(
        [str(venv_python), "-c", "import importlib.util as u; print([m for m in ('onnxruntime',"
         " 'paho', 'tuf', 'fastapi', 'sqlmodel', 'uvicorn') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "['onnxruntime', 'paho', 'tuf']", probe.stderr
    # --root: the unit and the config name the install's own paths.
    unit = installed.unit.read_text()
    assert (f"ExecStart={installed.agent} --config {installed.config} run") in unit
    assert f"ReadWritePaths={installed.state}\n" in unit
    assert f'state_dir = "{installed.state}"' in installed.config.read_text()
    # The commented default config is valid as written.
    doctor = subprocess.run([str(installed.agent), "--config", str(installed.config), "doctor",
                             "--json"], capture_output=True, text=True, timeout=120,
                            env=_clean_env())
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["config"]["status"] == "ok", checks["config"]
    assert checks["config"]["detail"] == f"{installed.config}: 1 setting(s), all valid"
    assert checks["enrolled"]["status"] == "FAIL"  # not yet


def test_a_second_run_changes_nothing(installed):
    before = _snapshot(installed.root)
    done = installed.install()
    assert done.returncode == 0, done.stderr
    assert _snapshot(installed.root) == before
    assert "venv     " in done.stdout and "exists, kept" in done.stdout
    assert "unchanged: kept" in done.stdout
    assert f"{installed.config} exists, not overwritten" in done.stdout
    assert f"{installed.unit} unchanged" in done.stdout


def test_the_installed_unit_passes_systemd_analyze_verify(installed):
    done = verify_unit(installed.unit)  # its ExecStart is the installed edge-agent
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


def test_enrolled_with_a_code_the_agent_runs_as_its_unit_says_and_the_doctor_passes(
        installed, tmp_path):
    fleet = start_fleet(tmp_path, None, f"sqlite:///{tmp_path / 'fleet.db'}")
    agent = None
    notify = NotifySocket(f"@edgefleet-install-{os.getpid()}-{free_port()}")
    try:
        code = fleet.add_device("cam-inst")
        done = installed.install("--fleet", fleet.url, "--code", code)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "enroll   enrolled cam-inst with" in done.stdout, done.stdout
        assert "systemd does not run here: start the agent with: " \
            f"{installed.agent} --config {installed.config} run" in done.stdout
        identity = json.loads((installed.state / "identity.json").read_text())
        assert identity["device_id"] == "cam-inst" and identity["fleet_url"] == fleet.url
        assert stat.S_IMODE((installed.state / "identity.json").stat().st_mode) == 0o600

        # An operator's edit, which later runs keep: a port of its own for the endpoint.
        listen = f"127.0.0.1:{free_port()}"
        text = installed.config.read_text().replace("[agent]\n",
                                                    f'[agent]\nlisten = "{listen}"\n')
        installed.config.write_text(text)

        exec_start = next(line.removeprefix("ExecStart=") for line in
                          installed.unit.read_text().splitlines()
                          if line.startswith("ExecStart="))
        agent = spawn(shlex.split(exec_start), tmp_path / "agent.log",
                      {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "60000000"})
        wait_until(lambda: notify.count("READY=1") == 1, timeout=90,
                   what=f"READY=1 from the unit's command; log:\n{agent.log()}")
        wait_until(lambda: (fleet.device("cam-inst") or {}).get("online"), timeout=90,
                   what=f"cam-inst online in the fleet; agent log:\n{agent.log()}")

        doctor = subprocess.run(
            [str(installed.agent), "--config", str(installed.config), "doctor", "--json"],
            capture_output=True, text=True, timeout=120, env=_clean_env())
        report = json.loads(doctor.stdout)
        statuses = {c["name"]: c["status"] for c in report["checks"]}
        assert doctor.returncode == 0, doctor.stdout
        assert statuses == {
            "config": "ok", "state dir": "ok", "enrolled": "ok", "root pin": "ok",
            "trust": "ok", "broker": "ok", "slots": "ok", "onnxruntime": "ok",
            "tflite": "warn",  # the agent extra only: TFLite is --extra tflite
            "endpoint": "ok"}, doctor.stdout
        details = {c["name"]: c["detail"] for c in report["checks"]}
        assert details["broker"].startswith(f"the running agent (pid {agent.process.pid}) is "
                                            "connected to mqtt://cam-inst@")
        assert details["endpoint"] == f"{listen} held by the running agent " \
            f"(pid {agent.process.pid})"

        again = installed.install("--fleet", fleet.url, "--code", code)
        assert again.returncode == 0, again.stderr
        assert f"already enrolled as cam-inst of {fleet.url}: skipped" in again.stdout
        assert f'listen = "{listen}"' in installed.config.read_text()

        assert agent.terminate(timeout=30) == 0
        assert notify.count("STOPPING=1") == 1
        wait_until(lambda: not fleet.device("cam-inst")["online"], timeout=60,
                   what="cam-inst offline after a clean stop")
    finally:
        if agent is not None:
            agent.terminate()
        notify.close()
        fleet.terminate()


# The real install (no --root): user made, files chowned, enrollment and the agent run as
# that user. /etc, /var and /opt are overlays in a private mount namespace, so the machine
# running the tests keeps its own; the fleet and the network are shared with it.
_NAMESPACE_SCRIPT = r"""
set -euo pipefail
layers="$1"; shift
for dir in etc var opt; do
  mkdir -p "/$dir" "$layers/$dir-up" "$layers/$dir-work"
  mount -t overlay overlay \
    -o "lowerdir=/$dir,upperdir=$layers/$dir-up,workdir=$layers/$dir-work" "/$dir"
done
cd /
getent passwd edgefleet >/dev/null && { echo "edgefleet exists before the install" >&2; exit 3; }
bash "$@"
echo "--- second run"
bash "$@"
stat -c '%U:%G %a %n' /var/lib/edgefleet /var/lib/edgefleet/identity.json /etc/edgefleet/agent.toml
exec_start="$(sed -n 's/^ExecStart=//p' /etc/systemd/system/edge-agent.service)"
# setpriv execs the agent itself (runuser would stay its parent): $! is the agent.
setpriv --reuid=edgefleet --regid=edgefleet --init-groups -- $exec_start \
  >"$layers/agent.log" 2>&1 &
agent=$!
for _ in $(seq 120); do  # until the running agent says it is connected (at most 60 s)
  if runuser -u edgefleet -- /opt/edgefleet/venv/bin/edge-agent status --json 2>/dev/null \
      | grep -q '"connected": true'; then break; fi
  sleep 0.5
done
echo "--- doctor"
runuser -u edgefleet -- /opt/edgefleet/venv/bin/edge-agent doctor || true
kill -TERM "$agent"
code=0; wait "$agent" || code=$?
echo "agent exit $code"
"""


def test_the_real_install_makes_the_user_and_runs_the_agent_as_it(installed, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the real install needs root (it makes a user; run in a namespace)")
    if getent_edgefleet():
        pytest.skip("this machine has an edgefleet user already (a real install)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 for the agent's venv")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t",
                            "tmpfs", "none", "/mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    fleet = start_fleet(tmp_path, None, f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        code = fleet.add_device("cam-real")
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", _NAMESPACE_SCRIPT,
             "namespace", str(tmp_path / "layers"), str(SCRIPT), "--python",
             "/usr/bin/python3", "--source", str(installed.wheel), "--fleet", fleet.url,
             "--code", code],
            capture_output=True, text=True, timeout=900, env=_clean_env())
        out = done.stdout
        agent_log = tmp_path / "layers" / "agent.log"
        assert done.returncode == 0, out + done.stderr
        first, second = out.split("--- second run")
        assert "user     edgefleet created (system user, no login shell, no home)" in first
        assert "/var/lib/edgefleet now owned by edgefleet" in first
        assert "enroll   enrolled cam-real with" in first
        assert "already enrolled as cam-real" in second and "created" not in second
        assert "edgefleet:edgefleet 700 /var/lib/edgefleet\n" in out
        assert "edgefleet:edgefleet 600 /var/lib/edgefleet/identity.json" in out
        assert "root:edgefleet 640 /etc/edgefleet/agent.toml" in out
        doctor = out.split("--- doctor")[1]
        assert "10 checks: all passed" in doctor, doctor + agent_log.read_text()
        assert "ok    broker:      the running agent (pid" in doctor
        assert "owner edgefleet" in doctor
        assert "agent exit 0" in out, agent_log.read_text()
        device = fleet.device("cam-real")
        assert device is not None and device["last_seen"], device
    finally:
        fleet.terminate()
    assert getent_edgefleet() is False  # the machine's own /etc was never touched


def getent_edgefleet() -> bool:
    return subprocess.run(["getent", "passwd", "edgefleet"], capture_output=True).returncode == 0
