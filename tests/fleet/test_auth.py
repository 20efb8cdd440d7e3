"""The API refuses callers without a valid token, and a token never leaks after creation.

Real ``edge-fleet serve`` over HTTP; tokens are made with the real ``edge-fleet token
create`` command against the same database.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
from sqlalchemy import text

from fleet.db import make_engine
from tests.fixtures.processes import console_script

BAD_CREDENTIALS = {
    "none": {},
    "unknown": {"Authorization": "Bearer ef_not-a-real-token"},
    "empty": {"Authorization": "Bearer"},
    "not_ours": {"Authorization": "Bearer abc"},
    "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
}


def test_request_without_a_valid_token_gets_401(fleet_server):
    for path in ("/api/v1/devices", "/api/v1/devices/x", "/api/v1/metrics", "/api/v1/tokens"):
        for case, headers in BAD_CREDENTIALS.items():
            response = httpx.get(fleet_server.url + path, headers=headers, timeout=5)
            assert response.status_code == 401, (path, case, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "detail" in response.json()


# Open by design: the broker address devices are told at enrollment (never credentials).
# And enrollment, whose credential is the one-time code in its body.
OPEN_API_ROUTES = {("get", "/api/v1/device-config"), ("post", "/api/v1/enroll")}


def test_every_api_route_needs_a_token(fleet_server):
    """Open by design: /healthz, /repo/ (signed metadata and hash-addressed bundles) and
    the device-config a device reads when it enrolls."""
    assert httpx.get(fleet_server.url + "/healthz").json()["status"] == "ok"
    spec = httpx.get(fleet_server.url + "/openapi.json").json()
    api_routes = [
        (method, path)
        for path, methods in spec["paths"].items()
        for method in methods
        if path.startswith("/api/")
    ]
    assert len(api_routes) >= 6, api_routes
    assert set(api_routes) >= OPEN_API_ROUTES
    for method, path in api_routes:
        if (method, path) in OPEN_API_ROUTES:
            assert "password" not in httpx.request(method, fleet_server.url + path).text
            continue
        concrete = path.replace("{device_id}", "x")
        response = httpx.request(method, fleet_server.url + concrete, json={})
        assert response.status_code == 401, (method, path)
    assert {p for p in spec["paths"] if not p.startswith("/api/")} == {
        "/healthz", "/repo/metadata/{name}", "/repo/targets/{name}"
    }


def test_first_start_writes_admin_token_to_a_private_file(fleet_server):
    token_file = fleet_server.data_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"admin token created: {token_file}" in fleet_server.log()
    assert fleet_server.get("/api/v1/devices").status_code == 200


def test_created_token_works_and_is_never_shown_again(fleet_server):
    created = subprocess.run(
        [*console_script("edge-fleet"), "token", "create", "--role", "viewer", "--name", "ci"],
        env={**os.environ, **fleet_server.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = created.stdout.strip()
    assert token.startswith("ef_") and len(token) >= 40
    assert token not in created.stderr

    with fleet_server.client(token) as client:
        assert client.get("/api/v1/devices").status_code == 200
        # a viewer cannot list tokens; the admin can, and sees no secret in the listing
        assert client.get("/api/v1/tokens").status_code == 403
    listing = fleet_server.get("/api/v1/tokens")
    assert listing.status_code == 200
    assert {"name": "ci", "role": "viewer"}.items() <= listing.json()[-1].items()
    assert token not in listing.text and fleet_server.token not in listing.text

    log = fleet_server.log()
    assert token not in log and fleet_server.token not in log
    db_url = fleet_server.env["EDGEFLEET_DATABASE_URL"]
    engine = make_engine(db_url)
    with engine.connect() as connection:
        rows = [str(tuple(row)) for row in connection.execute(text("SELECT * FROM apitoken"))]
    engine.dispose()
    assert len(rows) == 2
    assert not any(token in row or fleet_server.token in row for row in rows)
    if db_url.startswith("sqlite:///"):
        database = Path(db_url.removeprefix("sqlite:///"))
        stored = b"".join(
            path.read_bytes()
            for path in (database, database.with_name(database.name + "-wal"))
            if path.exists()
        )
        assert token.encode() not in stored and fleet_server.token.encode() not in stored
