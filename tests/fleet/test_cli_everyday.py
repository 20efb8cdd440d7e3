"""The everyday ``edge-fleet`` commands, run as an operator would: real processes against a
real running fleet (SQLite and PostgreSQL) or on a data directory. User mistakes end in
one line that says what to do, exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx

from agent.contract import EventMessage, encode, topic, utcnow
from tests.fixtures.models import build_mlp_onnx
from tests.fixtures.processes import console_script
from tests.fixtures.waiting import wait_until


def _local(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEFLEET_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([*console_script("edge-fleet"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _user_mistake(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def test_version_is_printed(tmp_path):
    done = _local(tmp_path, "--version")
    assert done.returncode == 0 and re.fullmatch(r"edge-fleet \S+\n", done.stdout)


def test_device_events_and_removal(fleet_server, raw_mqtt):
    for seq, event in enumerate(("desired_received", "downloading", "healthy"), start=1):
        raw_mqtt.publish(topic("cam-5", "events"), encode(EventMessage(
            device_id="cam-5", seq=seq, sent_at=utcnow(), event=event, detail={"step": seq})))
    wait_until(lambda: len(fleet_server.events("cam-5")) == 3, timeout=10, what="3 events")

    listed = fleet_server.cli("devices", "events", "cam-5")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[5] for line in listed.stdout.splitlines()
            if re.match(r"^│ \d", line)] == ["desired_received", "downloading", "healthy"]
    assert f"fleet {fleet_server.url}" in listed.stderr, "a remote command names its fleet"
    as_json = json.loads(fleet_server.cli("devices", "events", "cam-5", "--json",
                                          "--limit", "1").stdout)
    assert [row["event"] for row in as_json] == ["healthy"]

    removed = fleet_server.cli("devices", "remove", "cam-5")
    assert removed.returncode == 0, removed.stderr
    assert fleet_server.device("cam-5") is None and fleet_server.events("cam-5") == []
    again = fleet_server.cli("devices", "remove", "cam-5")
    assert again.returncode == 1 and "404" in again.stderr and "cam-5" in again.stderr


def test_tokens_are_listed_and_a_revoked_one_is_refused(fleet_server):
    viewer = fleet_server.cli("token", "create", "--role", "viewer", "--name", "grafana")
    secret = viewer.stdout.strip()
    assert httpx.get(f"{fleet_server.url}/api/v1/devices",
                     headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    listed = fleet_server.cli("token", "list")
    row = next(line for line in listed.stdout.splitlines() if "grafana" in line)
    token_id = row.split()[1]
    assert secret not in listed.stdout and "viewer" in row

    revoked = fleet_server.cli("token", "revoke", token_id)
    assert revoked.returncode == 0 and f"revoked token #{token_id}" in revoked.stdout
    assert httpx.get(f"{fleet_server.url}/api/v1/devices",
                     headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    _user_mistake(fleet_server.cli("token", "revoke", "9999"), "no token #9999")


def test_bundle_list_as_json_and_publish_into_the_named_data_directory(
    fleet_server, make_bundle, tmp_path
):
    bundle = make_bundle(version=4)
    elsewhere = tmp_path / "other-fleet"
    refused = _local(tmp_path, "bundle", "publish", str(bundle.path), "--data-dir", str(elsewhere))
    _user_mistake(refused, f"no repository in {elsewhere}", "keys")
    assert _local(tmp_path, "keys", "init", "--data-dir", str(elsewhere)).returncode == 0
    published = _local(tmp_path, "bundle", "publish", str(bundle.path), "--data-dir",
                       str(elsewhere))
    assert published.returncode == 0, published.stderr
    assert f"fleet data directory {elsewhere}" in published.stderr
    assert (elsewhere / "fleet.db").is_file() and not (tmp_path / "data").exists()
    assert json.loads(fleet_server.cli("bundle", "list", "--json").stdout) == []

    assert fleet_server.cli("bundle", "publish", str(bundle.path)).returncode == 0
    listed = json.loads(fleet_server.cli("bundle", "list", "--json").stdout)
    assert [(row["name"], row["version"]) for row in listed] == [("detector", 4)]
    _user_mistake(fleet_server.cli("bundle", "publish", str(bundle.path.parent)),
                  "is a directory", "detector-4.bundle")


def test_user_mistakes_are_one_line_with_the_fix(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model at all")
    build_mlp_onnx(tmp_path / "good.onnx")
    (tmp_path / "a-file").write_text("x")
    build = ("bundle", "build", "--name", "m", "--version", "1")
    _user_mistake(_local(tmp_path, *build, str(tmp_path / "empty.onnx")), "the file is empty")
    _user_mistake(_local(tmp_path, *build, str(tmp_path / "corrupt.onnx")),
                  "not a model this runtime can load")
    _user_mistake(_local(tmp_path, *build, str(tmp_path / "good.onnx"), "--out",
                         str(tmp_path / "a-file")), "takes the directory")
    rotate = _local(tmp_path, "keys", "rotate", "bogus")
    assert rotate.returncode == 2
    assert all(role in rotate.stderr for role in ("root", "targets", "snapshot", "timestamp",
                                                   "director"))


def test_the_api_explorer_needs_no_internet(fleet_server):
    page = httpx.get(f"{fleet_server.url}/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        if asset.endswith((".js", ".css")):
            assert httpx.get(f"{fleet_server.url}{asset}").status_code == 200, asset
