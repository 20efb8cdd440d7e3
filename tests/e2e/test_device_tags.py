"""Targeting devices: labels a device reports, tags an operator sets, selectors over both.

Real ``edge-fleet serve`` (SQLite and PostgreSQL), real broker; devices' reported states are
published with each device's own broker account, the CLI runs as an operator would.
"""

from __future__ import annotations

import json

from agent.contract import PlatformInfo, ReportedState, encode, topic, utcnow
from tests.fixtures.waiting import wait_until


def _report(raw_mqtt, device_id: str, labels: dict[str, str]) -> None:
    message = ReportedState(
        device_id=device_id, seq=1, sent_at=utcnow(), agent_version="1.0",
        platform=PlatformInfo(system="Linux", release="6", machine="aarch64", python="3.11"),
        labels=labels,
    )
    raw_mqtt.publish(topic(device_id, "reported"), encode(message), retain=True)


def _listed(fleet_server, selector: str) -> list[str]:
    done = fleet_server.cli("devices", "list", "--json", "--selector", selector)
    assert done.returncode == 0, done.stderr
    return [row["id"] for row in json.loads(done.stdout)]


def test_selectors_match_reported_labels_overlaid_by_operator_tags(fleet_server, raw_mqtt):
    _report(raw_mqtt, "cam-1", {"site": "berlin", "ring": "lab"})
    _report(raw_mqtt, "cam-2", {"site": "berlin"})
    _report(raw_mqtt, "cam-3", {"site": "paris"})
    wait_until(lambda: all((d := fleet_server.device(i)) and d["labels"]
                           for i in ("cam-1", "cam-2", "cam-3")),
               timeout=15, what="three devices with their labels")
    assert fleet_server.device("cam-1")["labels"] == {"site": "berlin", "ring": "lab"}
    assert _listed(fleet_server, "site=berlin") == ["cam-1", "cam-2"]

    tagged = fleet_server.cli("devices", "tag", "cam-1", "ring=canary")
    assert tagged.returncode == 0 and "cam-1: tags ring=canary" in tagged.stdout
    tagged = fleet_server.cli("devices", "tag", "cam-3", "ring=canary", "lab=yes")
    assert tagged.returncode == 0, tagged.stderr
    assert _listed(fleet_server, "ring=canary") == ["cam-1", "cam-3"]
    assert _listed(fleet_server, "site=berlin,ring!=canary") == ["cam-2"]
    assert _listed(fleet_server, "!lab") == ["cam-1", "cam-2"]

    untagged = fleet_server.cli("devices", "tag", "cam-3", "--remove", "lab")
    assert untagged.returncode == 0 and "cam-3: tags ring=canary" in untagged.stdout
    assert fleet_server.device("cam-3")["tags"] == {"ring": "canary"}


def test_tagging_mistakes_are_refused_by_name(fleet_server, raw_mqtt):
    _report(raw_mqtt, "cam-9", {})
    wait_until(lambda: fleet_server.device("cam-9"), timeout=15, what="cam-9")
    bad = fleet_server.cli("devices", "tag", "cam-9", "Ring=canary")
    assert bad.returncode == 2 and "'Ring'" in bad.stderr and "Traceback" not in bad.stderr
    unknown = fleet_server.cli("devices", "tag", "nobody", "ring=canary")
    assert unknown.returncode == 1 and "404" in unknown.stderr
    selector = fleet_server.cli("devices", "list", "--selector", "ring=")
    assert selector.returncode == 2 and "not a label value" in selector.stderr
    api = fleet_server.client().get("/api/v1/devices", params={"selector": "Ring"})
    assert api.status_code == 400 and api.json()["reason"] == "invalid_selector"

    viewer = fleet_server.cli("token", "create", "--role", "viewer").stdout.strip()
    refused = fleet_server.client(viewer).patch("/api/v1/devices/cam-9/tags",
                                                json={"add": {"ring": "canary"}})
    assert refused.status_code == 403
