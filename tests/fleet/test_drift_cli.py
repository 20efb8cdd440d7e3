"""``edge-fleet drift`` (fleet table, ``show``, ``settings``) run as an operator would: real
processes against one real running fleet (``edge-fleet serve`` on SQLite, a private
mosquitto) over HTTP with the admin token.

The boundary: the drift data comes from the fleet's database, not from devices. The test
writes ``Device``, ``DriftWindowRow`` and ``DriftAlert`` rows itself, as the ingest would
have stored them; the ingest path (agents' windows judged into these rows) is tested in
``tests/e2e/test_drift_fleet.py``. Settings go through the API, as the CLI sends them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from sqlmodel import Session

from agent.contract import utcnow
from fleet.db import make_engine
from fleet.local_broker import LocalBroker
from fleet.models import Device, DriftAlert, DriftWindowRow
from tests.fixtures.broker import DEPLOY_DIR, FLEET_ACCOUNT, PUBLISHER_ACCOUNT
from tests.fixtures.processes import FleetServer, start_fleet

FEATURES = [f"x[{i}]" for i in range(10)]  # brackets: a name must never be read as markup
NOW = utcnow()  # set again when the module's fleet is seeded (see the fixture)


def _stats(severity: float | None) -> list:
    """A stored feature: [psi, js, wasserstein, missing_delta, severity, rows]."""
    return [0.1, 0.05, 0.2, 0.0, severity, 500]


def _seed(database_url: str) -> None:
    """cam-hot drifts on x[0] and x[1] (an older alert of it cleared); cam-calm sends
    windows close to its thresholds but never crossed them; cam-quiet sent nothing."""
    engine = make_engine(database_url)
    with Session(engine) as session:
        for device_id in ("cam-hot", "cam-calm", "cam-quiet"):
            session.add(Device(id=device_id, active_model_name="detector",
                               active_model_version=4))
        for seq, minutes in enumerate((15, 10, 5), start=1):
            hot = {name: _stats(round(0.9 - 0.1 * i, 2)) for i, name in enumerate(FEATURES)}
            hot["x[0]"], hot["x[1]"] = _stats(1.0 + seq / 2), _stats(1.3)
            hot["x[9]"] = _stats(None)  # too few rows in this window
            session.add(DriftWindowRow(
                device_id="cam-hot", seq=seq, model="detector", version=4,
                window_started_at=NOW - timedelta(minutes=minutes + 5),
                window_ended_at=NOW - timedelta(minutes=minutes), rows=500,
                score=1.0 + seq / 2, features=hot))
        session.add(DriftWindowRow(
            device_id="cam-calm", seq=1, model="detector", version=4,
            window_ended_at=NOW - timedelta(minutes=4), rows=480, score=0.9,
            features={"x[1]": _stats(0.9), "x[2]": _stats(0.85), "x[3]": _stats(0.4)}))
        session.add(DriftAlert(
            device_id="cam-hot", model="detector", version=3, raised_at=NOW - timedelta(hours=5),
            cleared_at=NOW - timedelta(hours=3), last_window_at=NOW - timedelta(hours=3),
            score=0.3, peak_score=1.6, features=["x[4]"]))
        session.add(DriftAlert(
            device_id="cam-hot", model="detector", version=4,
            raised_at=NOW - timedelta(minutes=15), last_window_at=NOW - timedelta(minutes=5),
            score=2.5, peak_score=2.5, features=["x[0]", "x[1]"]))
        session.commit()
    engine.dispose()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[FleetServer]:
    """One fleet for the module (starting one costs seconds), seeded once; the tests
    below only read drift data, and each sets its own model's settings."""
    work = tmp_path_factory.mktemp("drift-cli")
    broker = LocalBroker(work / "broker", deploy_dir=DEPLOY_DIR).start()
    try:
        server = start_fleet(work, broker.url_for(FLEET_ACCOUNT),
                             f"sqlite:///{work / 'fleet.db'}",
                             publisher_broker_url=broker.url_for(PUBLISHER_ACCOUNT))
        try:
            global NOW
            NOW = utcnow()  # the seeded times are "minutes ago" when the tests run
            _seed(server.env["EDGEFLEET_DATABASE_URL"])
            yield server
        finally:
            server.terminate()
    finally:
        broker.stop()


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    """Wide enough that no table cell wraps: one row per line."""
    monkeypatch.setenv("COLUMNS", "220")


def _rows(stdout: str) -> list[list[str]]:
    """A rich table's rows as cells, its header row (┃) included."""
    return [[cell.strip() for cell in line.replace("┃", "│").strip().strip("│").split("│")]
            for line in stdout.splitlines() if line.startswith(("│", "┃"))]


def _ok(done) -> str:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def test_the_fleet_table_lists_the_drifting_device_first_with_its_features(fleet):
    table = _rows(_ok(fleet.cli("drift")))
    assert table[0][:4] == ["device", "model", "state", "score"]
    assert [row[0] for row in table[1:]] == ["cam-hot"], "by default: drifting devices only"
    _, model, state, score, features, since, last = table[1]
    assert (model, state, score, features) == ("detector v4", "DRIFTING", "2.50", "x[0], x[1]")
    assert since == f"{NOW - timedelta(minutes=15):%Y-%m-%d %H:%M}"
    assert last == f"{NOW - timedelta(minutes=5):%Y-%m-%d %H:%M}"

    every = _rows(_ok(fleet.cli("drift", "--all", "--since", "30m")))
    assert [row[0] for row in every[1:]] == ["cam-hot", "cam-calm"]
    assert every[2][2:5] == ["ok", "0.90", "x[1] 0.90, x[2] 0.85"], "near, not crossing"

    since = (NOW - timedelta(hours=1)).isoformat()
    as_json = json.loads(_ok(fleet.cli("drift", "--all", "--json", "--since", since)))
    api = fleet.get("/api/v1/drift?" + urlencode({"since": since, "all": "true"})).json()
    assert as_json == api and as_json["devices"][0]["alert"]["features"] == ["x[0]", "x[1]"]

    none = fleet.cli("drift", "--model", "classifier", "--since", "2h")
    assert none.returncode == 0 and none.stdout.startswith("no device drifts since ")
    assert "on model classifier" in none.stdout and len(none.stdout.splitlines()) == 1
    bad = fleet.cli("drift", "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_show_lists_alerts_and_windows_with_crossing_severities_marked(fleet):
    out = _ok(fleet.cli("drift", "show", "cam-hot"))
    rows = _rows(out)
    alerts = [row for row in rows if row[0].isdigit()]
    assert [(row[2], row[7]) for row in alerts] == [("open", "x[0], x[1]"), ("cleared", "x[4]")]
    header = next(row for row in rows if row[0] == "window end")
    assert header[4:] == FEATURES[:8], "the 8 with the highest severity, worst first"
    windows = [row for row in rows if row[1] == "detector v4" and not row[0].isdigit()]
    assert [row[3] for row in windows] == ["2.50", "2.00", "1.50"], "newest first"
    assert windows[0][4:7] == ["2.50!", "1.30!", "0.70"], "above 1: marked, not only red"
    assert "2 more feature(s) hidden" in out

    one = _rows(_ok(fleet.cli("drift", "show", "cam-hot", "--feature", "x[9]")))
    assert next(row for row in one if row[0] == "window end")[4:] == ["x[9]"]
    assert [row[4] for row in one if row[1] == "detector v4" and not row[0].isdigit()] == [
        "-"] * 3
    quiet = _ok(fleet.cli("drift", "show", "cam-quiet"))
    assert "cam-quiet: no drift alerts" in quiet and "cam-quiet: no drift windows" in quiet

    ghost = fleet.cli("drift", "show", "ghost")
    assert ghost.returncode == 1 and "404" in ghost.stderr and "no device 'ghost'" in ghost.stderr
    assert "Traceback" not in ghost.stderr


def test_settings_are_replaced_audited_and_refused_with_the_reason(fleet):
    before = {row[0]: row[1:] for row in _rows(_ok(fleet.cli("drift", "settings", "detector")))}
    assert before["psi"][1] == "-" and before["reduction"] == ["max", "-"]

    done = fleet.cli("drift", "settings", "detector", "--set", "psi=0.3", "--set", "min_rows=50",
                     "--set", "reduction=mean", "--set", "weight.x[0]=2", "--reason",
                     "noisy sensor")
    after = {row[0]: row[1:] for row in _rows(_ok(done))}
    assert after["psi"] == ["0.3", "0.3"] and after["min_rows"] == ["50", "50"]
    assert after["reduction"] == ["mean", "mean"] and after["weights"] == ["x[0]=2", "x[0]=2"]
    shown = json.loads(_ok(fleet.cli("drift", "settings", "detector", "--json")))
    assert shown["in_force"]["psi"] == 0.3 and shown["operator"] == {
        "psi": 0.3, "min_rows": 50, "reduction": "mean", "weights": {"x[0]": 2}}
    entries = fleet.get("/api/v1/audit?action=drift.settings").json()
    assert [(e["subject"], e["reason"]) for e in entries] == [("model:detector",
                                                               "noisy sensor")]

    for setting, problem in (("psi=-1", "psi must be > 0"),
                             ("bogus=1", "unknown drift setting 'bogus'"),
                             ("min_rows=2.5", "min_rows must be an integer")):
        refused = fleet.cli("drift", "settings", "detector", "--set", setting)
        assert refused.returncode != 0 and problem in refused.stderr, (setting, refused.stderr)
        assert refused.stderr.splitlines()[-1].startswith("error: ")
    malformed = fleet.cli("drift", "settings", "detector", "--set", "psi")
    assert malformed.returncode == 2 and "is not NAME=VALUE" in malformed.stderr

    reset = json.loads(_ok(fleet.cli("drift", "settings", "detector", "--reset", "--json")))
    assert reset["operator"] == {} and f"{reset['in_force']['psi']:g}" == before["psi"][0]
