"""The drift parts of the wire contract: baselines with summaries, and older forms still
read (a baseline without summaries, a drift message without window fields)."""

from __future__ import annotations

import json

import pytest

from agent.contract import (
    MAX_BASELINE_BINS,
    Baseline,
    DriftMessage,
    MessageRejected,
    SummarySpec,
    convert,
    decode,
    decode_device_message,
    encode,
    topic,
)


def _histogram(name: str, bins: int = 2) -> dict:
    return {"feature": name, "edges": [float(e) for e in range(bins + 1)], "counts": [1] * bins}


def test_a_baseline_of_the_form_before_summaries_still_loads():
    old = {"rows": 500, "features": [_histogram(f"x[{i}]") for i in range(4)]}
    baseline = decode(Baseline, json.dumps(old))
    assert baseline.summaries == [] and len(baseline.features) == 4


def test_a_summary_states_the_parameters_its_kind_needs():
    assert convert(SummarySpec, {"tensor": "x", "role": "input", "kind": "audio"}).kind == "audio"
    for kind, needed in (("values", "columns"), ("image", "channels"), ("classes", "classes")):
        with pytest.raises(MessageRejected, match=needed):
            convert(SummarySpec, {"tensor": "x", "role": "input", "kind": kind})
    with pytest.raises(MessageRejected, match="kind"):
        convert(SummarySpec, {"tensor": "x", "role": "input", "kind": "video"})


def test_baselines_refuse_what_a_device_could_not_bin_on():
    with pytest.raises(MessageRejected, match="features named twice: x"):
        convert(Baseline, {"rows": 1, "features": [_histogram("x"), _histogram("x")]})
    with pytest.raises(MessageRejected, match="strictly increasing"):
        convert(Baseline, {"rows": 1, "features": [
            {"feature": "x", "edges": [0.0, 0.0, 1.0], "counts": [1, 1]}]})
    assert convert(Baseline, {"rows": 1, "features": [_histogram("x", MAX_BASELINE_BINS)]})
    with pytest.raises(MessageRejected, match="edges"):  # its live histogram would not fit
        convert(Baseline, {"rows": 1, "features": [_histogram("x", MAX_BASELINE_BINS + 1)]})


def test_drift_messages_carry_the_window_and_still_read_without_it():
    message = {"device_id": "dev-1", "seq": 5, "sent_at": "2026-01-01T00:05:00Z",
               "kind": "drift", "model": {"name": "m", "version": 2},
               "features": [{"feature": "x[0]", "counts": [0, 3, 4, 0, 1]}]}
    older = decode_device_message(topic("dev-1", "drift"), json.dumps(message).encode())
    assert isinstance(older, DriftMessage) and older.rows is None
    newer = {**message, "rows": 8, "window_started_at": "2026-01-01T00:00:00Z"}
    decoded = decode_device_message(topic("dev-1", "drift"), json.dumps(newer).encode())
    assert decoded.rows == 8 and decode(DriftMessage, encode(decoded)) == decoded
