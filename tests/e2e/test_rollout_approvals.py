"""Who may steer a rollout: viewers read only, a rollout reaching a protected group waits
for a second person, and its creator cannot be that person.

Real ``edge-fleet serve`` (SQLite and PostgreSQL) over HTTP, tokens made by the real CLI;
devices registered by their own reported states over the real broker.
"""

from __future__ import annotations

import httpx

from agent.contract import PlatformInfo, ReportedState, encode, topic, utcnow
from tests.fixtures.waiting import wait_until


def _token(fleet_server, role: str, name: str) -> str:
    done = fleet_server.cli("token", "create", "--role", role, "--name", name)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _as(fleet_server, token: str) -> httpx.Client:
    return fleet_server.client(token)


def test_viewers_read_and_protected_rollouts_wait_for_a_second_person(
    fleet_server, raw_mqtt, make_bundle
):
    assert fleet_server.cli("bundle", "publish", str(make_bundle().path)).returncode == 0
    for device_id, ring in (("cam-1", "prod"), ("cam-2", "lab")):
        raw_mqtt.publish(topic(device_id, "reported"), encode(ReportedState(
            device_id=device_id, seq=1, sent_at=utcnow(), agent_version="1",
            platform=PlatformInfo(system="L", release="6", machine="x", python="3"),
            labels={"ring": ring})), retain=True)
    wait_until(lambda: all(fleet_server.device(d) for d in ("cam-1", "cam-2")),
               timeout=15, what="two devices")
    viewer = _token(fleet_server, "viewer", "vera")
    alice = _token(fleet_server, "operator", "alice")
    bob = _token(fleet_server, "operator", "bob")
    body = {"bundle": "detector", "version": 1, "selector": "ring=prod", "bake_s": 0}

    assert _as(fleet_server, viewer).post("/api/v1/rollouts", json=body).status_code == 403
    assert _as(fleet_server, alice).post("/api/v1/groups/protected", json={
        "name": "production", "selector": "ring=prod"}).status_code == 403, "admins only"
    protected = fleet_server.cli("rollout", "protect", "production", "--selector", "ring=prod")
    assert protected.returncode == 0, protected.stderr

    created = _as(fleet_server, alice).post("/api/v1/rollouts", json=body)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["status"] == "awaiting_approval" and "production" in rollout["reason"]
    assert rollout["waves"][0]["states"] == {"pending": 1}
    for action in ("pause", "abort"):
        refused = _as(fleet_server, viewer).post(f"/api/v1/rollouts/{rollout['id']}/{action}")
        assert refused.status_code == 403, action

    own = _as(fleet_server, alice).post(f"/api/v1/rollouts/{rollout['id']}/approve")
    assert own.status_code == 403 and own.json()["reason"] == "approval_by_creator"
    approved = fleet_server.cli("rollout", "approve", rollout["id"], token=bob)
    assert approved.returncode == 0 and "running" in approved.stdout, approved.stderr
    assert fleet_server.device("cam-2")["desired"] is None, "outside the selector"

    wait_until(lambda: fleet_server.device("cam-1")["desired"], timeout=30,
               what="the approved rollout notifying cam-1")
    entries = _as(fleet_server, viewer).get("/api/v1/audit", params={
        "subject": f"rollout:{rollout['id']}"}).json()
    approval = next(e for e in entries if e["action"] == "rollout.approve")
    assert approval["actor"].endswith(":bob")
