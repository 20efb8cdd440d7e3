"""``edge-agent`` as a person at a device's shell uses it: the everyday commands, help that
explains itself, clear refusals of typos, quick start-up, and pipes that close early.

Real processes of the installed console script, real model files, real onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent import __version__
from agent.cli import SIGPIPE_EXIT, _build_parser
from agent.daemon import fleet_silence
from agent.installer import _ProgressLog
from agent.runtime import InputError, TensorSpec, prepare_inputs
from tests.fixtures.models import MlpModelFile

_SCRIPT = str(Path(sys.executable).parent / "edge-agent")


def _agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_version_names_the_package_version():
    done = _agent("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"edge-agent {__version__}"


def test_log_level_is_accepted_after_the_command_and_a_wrong_one_is_usage(tmp_path):
    parser = _build_parser()
    assert parser.parse_args(["status", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "error", "status"]).log_level == "ERROR"
    # After the command wins over before it.
    assert parser.parse_args(["--log-level", "error", "status", "--log-level", "info"]
                             ).log_level == "INFO"
    assert parser.parse_args(["status"]).log_level == "INFO"
    wrong = _agent("infer", "m.onnx", "--input", "x.json", "--log-level", "loud")
    assert wrong.returncode == 2
    assert "'loud' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in wrong.stderr


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_every_command_an_example():
    parser = _build_parser()
    commands = _subcommands(parser)
    assert set(commands) == {"run", "enroll", "status", "rollback", "infer", "simulate",
                             "doctor"}
    for name, command in {"edge-agent": parser, **commands}.items():
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # each command's own help is checked below
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if name != "edge-agent":
            assert command.epilog and f"edge-agent {name} " in command.epilog, name
    assert "edge-agent enroll --fleet" in parser.epilog


def test_help_and_status_load_no_numpy_runtime_tuf_or_mqtt(tmp_path):
    """The fast path stays fast: the heavy libraries are imported by the commands that
    use them, never at start-up."""
    (tmp_path / "state").mkdir()
    probe = (
        "import sys, contextlib, io\n"
        "from agent.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['status', '--state-dir', {str(tmp_path / 'nothing')!r}]) == 2\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'numpy', 'onnxruntime', 'tuf', 'paho', 'urllib3'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [("rollback",), ("status",)])
def test_a_mistyped_state_dir_is_refused_and_not_created(tmp_path, command):
    typo = tmp_path / "agnet"
    done = _agent(*command, "--state-dir", str(typo))
    assert done.returncode == 2
    assert f"error: --state-dir {typo}: no such directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert not typo.exists()
    # A directory that exists but is not an agent's is refused too, and left alone.
    done = _agent(*command, "--state-dir", str(tmp_path))
    assert done.returncode == 2 and "not an agent's state directory" in done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing created"


def _direct(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def test_infer_accepts_the_endpoints_inputs_body(onnx_mlp: MlpModelFile, tmp_path):
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    for body in ({"inputs": x.tolist()}, {"inputs": {"x": x.tolist()}}):
        request = tmp_path / "request.json"
        request.write_text(json.dumps(body))
        done = _agent("infer", str(onnx_mlp.path), "--input", str(request))
        assert done.returncode == 0, (body, done.stderr)
        printed = np.array(json.loads(done.stdout)["outputs"]["y"], np.float32)
        np.testing.assert_array_equal(printed, _direct(onnx_mlp.path, x))


def test_a_text_input_is_refused_as_text_with_the_dtype_expected(onnx_mlp, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": [["a", "b", "c", "d"]]}))
    done = _agent("infer", str(onnx_mlp.path), "--input", str(request))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: input 'x': expected dtype float32, given text"
    spec = TensorSpec(name="x", dtype="float32", shape=(None, 4))
    for value in ([[1, "2", 3, 4]], [["nope"] * 4]):
        with pytest.raises(InputError, match=r"expected dtype float32, given text\Z"):
            prepare_inputs([spec], value)


def test_infer_into_a_pipe_closed_early_ends_quietly(onnx_mlp: MlpModelFile, tmp_path):
    """``edge-agent infer ... | head -c 100``: the output (MBs) outlives its reader."""
    request = tmp_path / "big.json"
    request.write_text(json.dumps([[0.1, 0.2, 0.3, 0.4]] * 40_000))
    done = subprocess.run(
        ["bash", "-c", f"{_SCRIPT} infer {onnx_mlp.path} --input {request} | head -c 100; "
         "status=${PIPESTATUS[0]}; echo; echo status=$status"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.stdout.startswith('{"model": ')
    assert done.stdout.rstrip().endswith(f"status={SIGPIPE_EXIT}"), done.stdout[-200:]
    assert done.stderr == "", done.stderr


def test_a_tiny_download_is_logged_in_bytes_and_kib_not_zero_mb(caplog):
    caplog.set_level(logging.INFO, logger="agent.installer")
    for have, total in ((0, 900), (900, 900)):
        _ProgressLog("m-1.bundle")(have, total)
    small = _ProgressLog("m-2.bundle")
    for have in (0, 3300):
        small(have, 3300)
    big = _ProgressLog("m-3.bundle")
    big(41 * 1024 * 1024, 82 * 1024 * 1024)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "downloading m-1.bundle: 0% (0 B of 900 B)",
        "downloading m-1.bundle: 100% (900 B of 900 B)",
        "downloading m-2.bundle: 0% (0 B of 3.2 KiB)",
        "downloading m-2.bundle: 100% (3.2 KiB of 3.2 KiB)",
        "downloading m-3.bundle: 50% (41.0 MiB of 82.0 MiB)",
    ]


def test_fleet_silence_warns_only_when_connected_long_enough_and_never_told_anything():
    quiet = {"heard": False, "has_desired": False, "connected_for_s": 61.0, "after_s": 60.0}
    level, text = fleet_silence(enrolled=False, **quiet)
    assert level == logging.WARNING and "not enrolled" in text and "edge-agent enroll" in text
    level, text = fleet_silence(enrolled=True, **quiet)
    assert level == logging.INFO and "first deployment" in text
    assert fleet_silence(enrolled=False, **{**quiet, "connected_for_s": 59.0}) is None
    assert fleet_silence(enrolled=False, **{**quiet, "heard": True}) is None
    assert fleet_silence(enrolled=False, **{**quiet, "has_desired": True}) is None
