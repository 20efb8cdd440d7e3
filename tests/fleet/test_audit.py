"""The audit log: operator actions recorded with who, what and why, read back with
filters over a real running fleet, and a hash chain that ``edge-fleet audit verify`` (a
real CLI process) checks. Every tamper test first drops the database's append-only
triggers, as an attacker with database access would: verification must not need them."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from agent.contract import EventMessage, encode, topic, utcnow
from fleet import audit
from fleet.db import init_db, make_engine
from tests.fixtures.processes import console_script
from tests.fixtures.waiting import wait_until


def _audit(fleet_server, *args: str) -> list[dict]:
    done = fleet_server.cli("audit", "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_operator_actions_are_recorded_and_listed_with_filters(
    fleet_server, make_bundle, raw_mqtt
):
    user = getpass.getuser()
    assert fleet_server.cli("bundle", "publish", str(make_bundle().path)).returncode == 0
    created = fleet_server.cli("token", "create", "--role", "viewer", "--name", "grafana")
    assert created.returncode == 0, created.stderr
    viewer = created.stdout.strip()
    deployed = fleet_server.cli("deploy", "detector", "--version", "1", "--device", "cam-9",
                                "--device", "cam-8", "--allow-unknown")
    assert deployed.returncode == 0, deployed.stderr
    raw_mqtt.publish(topic("cam-5", "events"), encode(EventMessage(
        device_id="cam-5", seq=1, sent_at=utcnow(), event="healthy", detail={})))
    wait_until(lambda: fleet_server.device("cam-5") is not None, timeout=10, what="cam-5")
    assert fleet_server.cli("devices", "remove", "cam-5").returncode == 0
    # Refused actions change nothing, so they record nothing.
    assert fleet_server.cli("devices", "remove", "cam-5").returncode == 1
    assert fleet_server.cli("deploy", "nothing", "--version", "3", "--device", "cam-9",
                            "--allow-unknown").returncode == 1
    token_id = next(line.split()[1] for line in fleet_server.cli("token", "list")
                    .stdout.splitlines() if "grafana" in line)
    assert fleet_server.cli("token", "revoke", token_id).returncode == 0
    assert fleet_server.cli("token", "revoke", token_id).returncode == 0  # already: no entry

    entries = _audit(fleet_server)
    assert [(e["seq"], e["actor"], e["action"]) for e in entries] == [
        (1, "system:serve", "token.create"),
        (2, f"cli:{user}", "token.create"),
        (3, "token:1:initial admin", "deploy"),
        (4, "token:1:initial admin", "device.remove"),
        (5, f"cli:{user}", "token.revoke"),
    ]
    deploy = entries[2]
    assert deploy["subject"] == "bundle:detector:1"
    assert deploy["details"]["generations"] == {"cam-8": 1, "cam-9": 1}
    assert deploy["details"]["device_count"] == 2 and deploy["details"]["version"] == 1
    assert entries[3]["subject"] == "device:cam-5"
    assert entries[1]["subject"] == entries[4]["subject"] == f"token:{token_id}:grafana"
    assert [e["prev_hash"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]

    assert [e["seq"] for e in _audit(fleet_server, "--action", "token")] == [1, 2, 5]
    assert [e["seq"] for e in _audit(fleet_server, "--action", "token.revoke")] == [5]
    assert [e["seq"] for e in _audit(fleet_server, "--action", "tok")] == []
    assert [e["seq"] for e in _audit(fleet_server, "--actor", "token:1")] == [3, 4]
    assert [e["seq"] for e in _audit(fleet_server, "--actor", "cli", "--action",
                                     "token.create")] == [2]
    assert [e["seq"] for e in _audit(fleet_server, "--subject", "bundle:detector")] == [3]
    assert [e["seq"] for e in _audit(fleet_server, "--limit", "2")] == [4, 5]
    assert _audit(fleet_server, "--since", "2999-01-01T00:00:00Z") == []
    assert len(_audit(fleet_server, "--since", deploy["at"])) == 3

    table = fleet_server.cli("audit", "list", "--subject", "device:cam-5")
    assert table.returncode == 0 and "device.remove" in table.stdout, table.stdout
    bad = fleet_server.cli("audit", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr

    verified = fleet_server.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"audit log intact: 5 entries, head 5 {entries[-1]['hash']}" in verified.stdout
    anchored = fleet_server.cli("audit", "verify", "--expect", f"3:{deploy['hash'][:16]}")
    assert anchored.returncode == 0, anchored.stdout

    # Any token may read the log; only an admin asks the server to verify it.
    another = fleet_server.cli("token", "create", "--role", "viewer", "--name", "ro").stdout
    with fleet_server.client(another.strip()) as client:
        assert client.get("/api/v1/audit", params={"action": "deploy"}).json()[0]["seq"] == 3
        assert client.get("/api/v1/audit/verify").status_code == 403
    with fleet_server.client(viewer) as client:
        assert client.get("/api/v1/audit").status_code == 401  # revoked
    report = fleet_server.get("/api/v1/audit/verify").json()
    assert report["ok"] is True and report["entries"] == 6 and report["problems"] == []


# --- tampering, straight in the database -------------------------------------------------


def _fleet_with_log(tmp_path: Path, database_url: str, entries: int = 6):
    engine = make_engine(database_url)
    init_db(engine)
    for n in range(1, entries + 1):
        with Session(engine) as session:
            audit.record(session, f"token:{n}:op", "deploy", f"bundle:m:{n}",
                         f"step {n}", {"figures": {"error_rate": n / 10, "devices": n}})
            session.commit()
    return engine


def _verify_cli(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(data_dir),
           "EDGEFLEET_DATABASE_URL": database_url}
    return subprocess.run([*console_script("edge-fleet"), "audit", "verify", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _drop_append_only_triggers(engine) -> None:
    """What an attacker does first; also proves the triggers were there."""
    with engine.connect() as connection:
        with pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text("UPDATE audit_entry SET reason = 'x' WHERE seq = 1"))
        connection.rollback()
        with pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text("DELETE FROM audit_entry WHERE seq = 1"))
        connection.rollback()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("DROP TRIGGER audit_entry_append_only ON audit_entry"))
        else:
            connection.execute(text("DROP TRIGGER audit_entry_no_update"))
            connection.execute(text("DROP TRIGGER audit_entry_no_delete"))


def _swap(connection, a: int, b: int) -> None:
    columns = ["at", "actor", "action", "subject", "reason", "details", "prev_hash", "hash"]
    rows = {row.seq: row for row in connection.execute(text(
        f"SELECT seq, {', '.join(columns)} FROM audit_entry WHERE seq IN ({a}, {b})"))}
    for target, source in ((a, b), (b, a)):
        values = {c: getattr(rows[source], c) for c in columns}
        if not isinstance(values["details"], str):
            values["details"] = json.dumps(values["details"])
        connection.execute(text(
            f"UPDATE audit_entry SET {', '.join(f'{c} = :{c}' for c in columns)} "
            "WHERE seq = :seq"), {**values, "seq": target})


TAMPERING = {
    "edited_reason": ("UPDATE audit_entry SET reason = 'nothing to see' WHERE seq = 3",
                      ["entry 3: edited"]),
    "edited_details": ("UPDATE audit_entry SET details = '{\"figures\": {}}' WHERE seq = 2",
                       ["entry 2: edited"]),
    "removed": ("DELETE FROM audit_entry WHERE seq = 4", ["entry 4: missing"]),
    "removed_two": ("DELETE FROM audit_entry WHERE seq IN (2, 3)",
                    ["entry 2: missing: entries 2 to 3 removed"]),
    "removed_newest": ("DELETE FROM audit_entry WHERE seq = 6",
                       ["entry 6: missing: entry 6 removed from the end"]),
    "swapped": (_swap, ["entry 2: edited", "entry 2: reordered", "entry 5: edited",
                        "entry 5: reordered"]),
    "forged_head": ("UPDATE audit_head SET hash = '" + "f" * 64 + "'", ["head: head"]),
}


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_audit_verify_names_each_tampered_entry(tmp_path, database_url, kind):
    engine = _fleet_with_log(tmp_path, database_url)
    intact = _verify_cli(tmp_path, database_url)
    assert intact.returncode == 0 and "audit log intact: 6 entries" in intact.stdout, intact
    _drop_append_only_triggers(engine)
    change, named = TAMPERING[kind]
    with engine.begin() as connection:
        if callable(change):
            change(connection, 2, 5)
        else:
            connection.execute(text(change))
    engine.dispose()
    done = _verify_cli(tmp_path, database_url)
    assert done.returncode == 1, (done.stdout, done.stderr)
    for words in named:
        assert words in done.stdout, (words, done.stdout)
    assert "NOT intact" in done.stderr and "Traceback" not in done.stderr
    as_json = json.loads(_verify_cli(tmp_path, database_url, "--json").stdout)
    assert as_json["ok"] is False and as_json["problems"]


def test_a_chain_rewritten_from_an_anchor_on_is_caught_by_the_kept_hash(
    tmp_path, database_url
):
    engine = _fleet_with_log(tmp_path, database_url, entries=3)
    with Session(engine) as session:
        kept = audit.verify(session)
    # A thorough attacker: removes everything and writes a chain of their own.
    _drop_append_only_triggers(engine)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_entry"))
        connection.execute(text("DELETE FROM audit_head"))
    _fleet_with_log(tmp_path, database_url, entries=3)
    assert _verify_cli(tmp_path, database_url).returncode == 0  # self-consistent...
    done = _verify_cli(tmp_path, database_url, "--expect", f"3:{kept.head_hash}")
    assert done.returncode == 1 and "entry 3: anchor" in done.stdout, done.stdout  # ...caught


def test_concurrent_appenders_make_one_unbroken_chain(tmp_path, database_url):
    engine = _fleet_with_log(tmp_path, database_url, entries=1)
    errors: list[BaseException] = []

    def appender(worker: int) -> None:
        try:
            for n in range(15):
                with Session(engine) as session:
                    audit.record(session, f"worker:{worker}", "deploy", f"n:{n}", "load")
                    session.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with Session(engine) as session:
        report = audit.verify(session)
    assert report.ok and report.entries == report.head_seq == 61, report.problems


def test_details_are_bounded_json():
    with pytest.raises(ValueError, match="finite JSON"):
        audit._bounded_details({"x": float("nan")})
    with pytest.raises(ValueError, match="bytes"):
        audit._bounded_details({"x": "y" * 20_000})
    with pytest.raises(ValueError, match="deeper"):
        audit._bounded_details({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}})
    assert audit._bounded_details({"t": (1, 2), "u": None}) == {"t": [1, 2], "u": None}
