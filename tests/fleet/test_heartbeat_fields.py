"""The heartbeat's fields are declared by the wire contract; the fleet's storage declares
its columns once (``HeartbeatFigures``) and everything else reads them from there. These
tests hold the two equal, so a figure a device sends cannot be silently dropped."""

from __future__ import annotations

import msgspec

from agent.contract import DeviceMessage, HeartbeatTelemetry
from agent.stats import InferenceStats
from fleet.models import HeartbeatFigures, HeartbeatPublic, HeartbeatRow
from fleet.telemetry import _COLUMNS

ENVELOPE = {field.name for field in msgspec.structs.fields(DeviceMessage)} | {"kind"}


def _contract_fields() -> dict[str, msgspec.structs.FieldInfo]:
    return {
        field.name: field for field in msgspec.structs.fields(HeartbeatTelemetry)
        if field.name not in ENVELOPE
    }


def test_the_stored_figures_are_the_contracts_scalar_fields():
    scalar = {name for name, field in _contract_fields().items()
              if not isinstance(msgspec.inspect.type_info(field.type), msgspec.inspect.UnionType)
              or all(not isinstance(t, msgspec.inspect.DictType)
                     for t in msgspec.inspect.type_info(field.type).types)}
    assert set(HeartbeatFigures.model_fields) == scalar
    assert scalar <= set(_COLUMNS)


def test_the_api_shows_every_field_a_device_sends():
    assert set(_contract_fields()) <= set(HeartbeatPublic.model_fields)
    assert set(HeartbeatFigures.model_fields) <= set(HeartbeatRow.model_fields)


def test_the_agents_counters_are_heartbeat_fields():
    assert set(InferenceStats().snapshot()) <= set(_contract_fields())
