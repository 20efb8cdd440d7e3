"""Device labels: checked against the contract's bounds at start-up, refused with exit 2."""

from __future__ import annotations

import pytest

from agent.cli import main
from agent.contract import MAX_LABELS
from agent.labels import LabelError, labels_from_env, parse_labels


def test_labels_parse_into_a_mapping():
    assert parse_labels(["site=berlin", "ring=canary", "hw=rpi4:8gb"]) == {
        "site": "berlin", "ring": "canary", "hw": "rpi4:8gb"}
    assert labels_from_env("site=berlin, ring=canary,") == ["site=berlin", "ring=canary"]


@pytest.mark.parametrize(("items", "says"), [
    (["site"], "expected KEY=VALUE"),
    (["Site=berlin"], "label key 'Site'"),
    (["site="], "label site=''"),
    (["site=ber lin"], "label site='ber lin'"),
    (["site=a", "site=b"], "given twice"),
    ([f"k{i}=v" for i in range(MAX_LABELS + 1)], f"at most {MAX_LABELS}"),
])
def test_a_label_the_fleet_would_refuse_is_refused_naming_it(items, says):
    with pytest.raises(LabelError, match=says):
        parse_labels(items)


def test_run_and_simulate_refuse_a_bad_label_at_start_up_with_exit_2(tmp_path, capsys,
                                                                     monkeypatch):
    state = ["--state-dir", str(tmp_path / "s")]
    assert main(["run", *state, "--label", "site=berlin", "--label", "BAD=1"]) == 2
    assert "--label: label key 'BAD'" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_AGENT_LABELS", "site=berlin,ring=can ary")
    assert main(["run", *state]) == 2
    assert "EDGE_AGENT_LABELS: label ring='can ary'" in capsys.readouterr().err
    assert main(["simulate", "--devices", "2", "--fleet", "http://127.0.0.1:9",
                 "--state-root", str(tmp_path / "sim")]) == 2
    assert "EDGE_AGENT_LABELS" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "sim").exists()
