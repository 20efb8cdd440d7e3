"""``edge-agent --config agent.toml``: run's options written down once per device.

The file's keys come from the ``run`` parser itself; values are checked as the command line
checks them; precedence is command line > environment > file > defaults; anything the
parser does not know is refused with the file and the key named (exit 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import agent.config_file as config_file
from agent.cli import _build_parser, _with_config, main
from agent.config_file import MAX_CONFIG_BYTES, settings_of

_SCRIPT = str(Path(sys.executable).parent / "edge-agent")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No EDGE_AGENT_* variable of the machine, and no /etc/edgefleet/agent.toml."""
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config_file, "DEFAULT_CONFIG", tmp_path / "etc" / "agent.toml")


def _parse(*argv: str) -> argparse.Namespace | None:
    parser = _build_parser()  # after the environment is set: defaults read it
    return _with_config(parser, list(argv), parser.parse_args(list(argv)))


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


_FULL = """\
[agent]
state_dir = "/srv/edge"
listen = "0.0.0.0:9000"
interval = 3              # an integer where run takes a float
keepalive = 30
max_bundle_mb = 64.5
log_level = "debug"
providers = ["CPUExecutionProvider"]
fleet_silence = 120

[agent.labels]
site = "berlin"
ring = "canary"
"""


def test_the_files_values_become_runs_options(tmp_path):
    args = _parse("--config", str(_config(tmp_path, _FULL)), "run")
    assert args.state_dir == Path("/srv/edge")
    assert args.listen == "0.0.0.0:9000"
    assert args.interval == 3.0 and isinstance(args.interval, float)
    assert args.keepalive == 30
    assert args.max_bundle_mb == 64.5
    assert args.log_level == "DEBUG"  # through run's own converter
    assert args.providers == ["CPUExecutionProvider"]
    assert sorted(args.labels) == ["ring=canary", "site=berlin"]
    assert args.fleet_silence == 120.0
    assert args.config_file == tmp_path / "agent.toml"


def test_the_command_line_wins_over_the_file(tmp_path):
    path = str(_config(tmp_path, _FULL))
    args = _parse("--config", path, "--log-level", "ERROR", "run", "--interval", "7",
                  "--listen", "off", "--label", "ring=lab")
    assert (args.interval, args.listen, args.log_level) == (7.0, "off", "ERROR")
    assert args.labels == ["ring=lab"]  # replaced, not added to the file's
    assert _parse("--config", path, "run", "--log-level", "WARNING").log_level == "WARNING"


def test_the_environment_wins_over_the_file_and_the_command_line_over_both(tmp_path,
                                                                          monkeypatch):
    path = str(_config(tmp_path, _FULL))
    monkeypatch.setenv("EDGE_AGENT_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("EDGE_AGENT_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("EDGE_AGENT_LABELS", "site=paris")
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", "/from/env")
    args = _parse("--config", path, "run")
    assert args.listen == "127.0.0.1:7000"
    assert args.log_level == "ERROR"
    assert args.labels is None  # run reads EDGE_AGENT_LABELS itself
    assert args.state_dir == Path("/from/env")
    assert args.interval == 3.0  # no variable for it: the file's
    assert _parse("--config", path, "run", "--listen", "off").listen == "off"


def test_defaults_stand_where_the_file_is_silent(tmp_path):
    args = _parse("--config", str(_config(tmp_path, "[agent]\ninterval = 2\n")), "run")
    assert (args.interval, args.keepalive, args.listen) == (2.0, 15, "127.0.0.1:8470")
    assert args.labels is None


def test_the_state_dir_applies_to_every_device_command_but_not_to_the_simulator(tmp_path):
    path = str(_config(tmp_path, "[agent]\nstate_dir = \"/srv/edge\"\ninterval = 2\n"))
    for command in (["status"], ["rollback"], ["doctor"],
                    ["enroll", "--fleet", "http://fleet:8000"]):
        assert _parse("--config", path, *command).state_dir == Path("/srv/edge"), command
    simulated = _parse("--config", path, "simulate", "--devices", "2", "--fleet", "http://f:1")
    assert simulated.interval == 10.0


@pytest.mark.parametrize(("text", "named"), [
    ("[agent]\nlisen = \"0.0.0.0:1\"\n", "unknown setting 'lisen' in [agent]"),
    ("[agent]\ninterval = \"fast\"\n", "[agent] interval: expected a number, given a string"),
    ("[agent]\ninterval = true\n", "[agent] interval: expected a number, given a boolean"),
    ("[agent]\nkeepalive = 1.5\n", "[agent] keepalive: expected a whole number"),
    ("[agent]\nlog_level = \"loud\"\n", "[agent] log_level: 'loud' is not one of DEBUG"),
    ("[agent]\nlisten = 8470\n", "[agent] listen: expected a string, given a number"),
    ("[agent]\nproviders = \"CPUExecutionProvider\"\n",
     "[agent] providers: expected a list of strings"),
    ("[agent.labels]\nsite = 3\n", "[agent] labels.site: expected a string, given a number"),
    ("[agent.labels]\n\"Bad Key\" = \"x\"\n", "[agent] labels: label key 'Bad Key'"),
    ("[agent]\nconfig = \"/etc/x.toml\"\n", "unknown setting 'config'"),
    ("[agnet]\ninterval = 3\n", "unknown table [agnet]: settings go in the [agent] table"),
    ("interval = 3\n", "unknown key 'interval': settings go in the [agent] table"),
    ("[agent]\ninterval = \n", "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path, capsys, text, named):
    path = _config(tmp_path, text)
    assert main(["--config", str(path), "status", "--state-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"config file {path}" in error
    assert named in error


def test_a_file_over_64_kib_is_refused(tmp_path, capsys):
    path = _config(tmp_path, "[agent]\n" + "#" * MAX_CONFIG_BYTES + "\n")
    assert main(["--config", str(path), "status"]) == 2
    assert "larger than 64 KiB" in capsys.readouterr().err


def test_a_named_file_must_exist_and_none_means_no_file(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "status"]) == 2
    assert f"config file {missing}: no such file" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(missing))
    assert main(["status", "--state-dir", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "none")
    assert _parse("run").config_file is None


def test_the_default_file_is_read_only_if_it_exists(tmp_path):
    assert _parse("run").config_file is None
    config_file.DEFAULT_CONFIG.parent.mkdir()
    config_file.DEFAULT_CONFIG.write_text("[agent]\nkeepalive = 40\n")
    args = _parse("run")
    assert (args.config_file, args.keepalive) == (config_file.DEFAULT_CONFIG, 40)
    assert _parse("--config", "none", "run").keepalive == 15


def test_the_environment_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(_config(tmp_path, "[agent]\nkeepalive = 41\n")))
    assert _parse("run").keepalive == 41


def test_every_option_of_run_is_a_key_and_its_variable_is_the_one_its_help_names():
    run = next(action for action in _build_parser()._actions
               if isinstance(action, argparse._SubParsersAction)).choices["run"]
    settings = settings_of(run)
    long_options = {action.dest for action in run._actions
                    if any(flag.startswith("--") for flag in action.option_strings)}
    assert set(settings) == long_options - {"help", "config"}
    assert {"state_dir", "listen", "interval", "keepalive", "labels", "log_level",
            "max_bundle_mb", "outbox_mb", "providers", "threads"} <= set(settings)
    for key, setting in settings.items():
        assert setting.env in (None, f"EDGE_AGENT_{key.upper()}"), key
    assert settings["listen"].env == "EDGE_AGENT_LISTEN"
    assert settings["interval"].env is None
    assert settings["labels"].kind == "table" and settings["providers"].kind == "list"


def test_the_installed_command_reads_the_file(tmp_path):
    state_dir = tmp_path / "state"
    path = _config(tmp_path, f"[agent]\nstate_dir = \"{state_dir}\"\n")
    done = subprocess.run([_SCRIPT, "--config", str(path), "doctor", "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EDGE_AGENT_CONFIG": ""})
    assert f"{state_dir}: no such directory" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1
    bad = _config(tmp_path, "[agent]\nstate_dri = \"/x\"\n")
    done = subprocess.run([_SCRIPT, "--config", str(bad), "run"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert f"config file {bad}: unknown setting 'state_dri'" in done.stderr
