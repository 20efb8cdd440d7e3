"""Property-based test of the REST API: Schemathesis generates requests from the live
OpenAPI document of a running ``edge-fleet serve`` (real uvicorn, real database, real
broker) and checks every answer against the document. No request may get a 5xx, and no
answer may contradict the schema (status codes, content types, bodies).

Bounded in time: a fixed number of examples per operation, with the admin token, so the
generated requests reach the routes rather than stopping at authentication.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _exercise(operation, base_url: str, headers: dict[str, str], tried: dict[str, int]) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)
        tried[operation.label] = tried.get(operation.label, 0) + 1

    run()


def test_generated_requests_get_no_5xx_and_answers_that_fit_the_schema(fleet_server):
    schema = schemathesis.openapi.from_url(f"{fleet_server.url}/openapi.json")
    auth = {"Authorization": f"Bearer {fleet_server.token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    tried: dict[str, int] = {}
    for operation in operations:
        _exercise(operation, fleet_server.url, auth, tried)
    assert fleet_server.process.poll() is None
    assert set(tried) == {op.label for op in operations}, "every operation was exercised"


def test_a_deployment_to_malformed_device_ids_is_a_schema_refusal_naming_them(fleet_server):
    for bad in ("a/b", "x" * 65, "-lead", "dev\n", "$SYS", ""):
        response = fleet_server.client().post(
            "/api/v1/deployments", json={"bundle": "m", "version": 1, "devices": ["ok", bad]})
        assert response.status_code == 422, (bad, response.text)
        problems = response.json()["detail"]
        assert isinstance(problems, list)
        assert problems[0]["loc"] == ["body", "devices", 1], problems


def test_a_deployment_of_an_unknown_bundle_is_404_with_its_reason(fleet_server):
    response = fleet_server.client().post(
        "/api/v1/deployments", json={"bundle": "nothing", "version": 3, "devices": ["cam-1"]})
    assert response.status_code == 404
    assert response.json() == {"detail": "no published bundle nothing v3",
                               "reason": "unknown_bundle"}
