"""A device's engine options (providers, threads): mapped per model, honoured by the
installer, and refused at start-up when wrong. Real bundles, real onnxruntime sessions,
real ``edge-agent`` processes for the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.bundle import extract_bundle
from agent.installer import Installer
from agent.runtime import EngineError, EngineOptions, check_providers
from agent.slots import Slots

_EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def test_threads_map_to_each_runtime_and_providers_to_onnx_only():
    options = EngineOptions(providers=("CPUExecutionProvider",), threads=2)

    assert options.for_model("slot/model.onnx") == {
        "providers": ["CPUExecutionProvider"], "intra_op_threads": 2,
    }
    assert options.for_model("slot/model.tflite") == {"num_threads": 2}
    assert EngineOptions().for_model("model.onnx") == {}
    assert EngineOptions().for_model("model.tflite") == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": 0}, "threads must be at least 1, given 0"),
     ({"providers": ()}, "give at least one")],
)
def test_impossible_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**kwargs)


def test_unknown_provider_is_named_with_the_available_ones():
    with pytest.raises(EngineError, match=r"\['NoSuchProvider'\] not available.*available: "
                                          r".*CPUExecutionProvider"):
        check_providers(["CPUExecutionProvider", "NoSuchProvider"])


def test_the_installer_loads_models_with_the_device_options(make_bundle, tmp_path: Path):
    state_dir = tmp_path / "device"
    slots = Slots(state_dir)
    extract_bundle(make_bundle(version=1).path, slots.path("a"), 1 << 26)
    slots.activate("a")
    installer = Installer(state_dir, lambda: None, lambda *_, **__: None, 1 << 26,
                          engine_options=EngineOptions(threads=1))

    loaded = installer.load_active()

    assert loaded is not None
    session = loaded.engine._session  # the real onnxruntime session behind the engine
    assert session.get_session_options().intra_op_num_threads == 1
    loaded.engine.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--provider", "NoSuchProvider"], "error: --provider: execution provider(s) "
                                           "['NoSuchProvider'] not available"),
        (["--threads", "0"], "error: --threads must be at least 1, given 0"),
    ],
)
def test_run_refuses_wrong_engine_options_before_starting(tmp_path: Path, argv, message):
    result = subprocess.run(
        [_EDGE_AGENT, "run", "--broker", "mqtt://127.0.0.1:9", "--listen", "off",
         "--state-dir", str(tmp_path / "state"), *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "state").exists()  # refused before anything was set up
