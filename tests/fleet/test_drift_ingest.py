"""Drift windows through the ingest writer: judged, stored once, alerts with hysteresis,
and hostile windows costing only themselves.

The ingest writer runs for real on SQLite and PostgreSQL; the broker is left out (messages
are handed to the writer as the MQTT link would, with an acknowledgement callback), and the
bundle's baseline is inserted as publishing stores it (``BundleBaseline``): the boundaries
these tests stand in for. Devices and the broker are covered by tests/e2e/test_drift_*.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from sqlmodel import Session, select

from agent.contract import (
    ActiveModel,
    Baseline,
    BaselineHistogram,
    DriftMessage,
    DriftThresholdSpec,
    FeatureHistogram,
    encode,
    to_data,
    topic,
    utcnow,
)
from agent.drift.bins import live_counts
from agent.mqtt import BrokerAddress, Inbound
from fleet.db import init_db, make_engine
from fleet.drift.compare import output_shift, rebin
from fleet.drift.judge import DriftSettings, check_operator_settings
from fleet.drift.stats import DriftConfigError
from fleet.drift.store import fleet_view, set_settings
from fleet.ingest import IngestWorker
from fleet.models import AuditEntry, BundleBaseline, DriftAlert, DriftWindowRow

BINS = 20
FEATURES = ("x[0]", "x[1]", "x[2]")


def _baseline(thresholds: DriftThresholdSpec | None = None) -> Baseline:
    rng = np.random.default_rng(0)
    features = []
    for name in FEATURES:
        values = rng.normal(size=50_000)
        edges = np.quantile(values, np.linspace(0, 1, BINS + 1))
        counts, _ = np.histogram(values, edges)
        features.append(BaselineHistogram(feature=name, edges=edges.tolist(),
                                          counts=counts.tolist()))
    features.append(BaselineHistogram(feature="output:y.class", edges=[0, 1, 2, 3],
                                      counts=[300, 300, 400]))
    return Baseline(rows=50_000, features=features, thresholds=thresholds)


BASELINE = _baseline()


@pytest.fixture
def writer(database_url):
    engine = make_engine(database_url)
    init_db(engine)
    with Session(engine) as session:
        session.add(BundleBaseline(name="detector", version=1, baseline=to_data(BASELINE)))
        session.commit()
    worker = IngestWorker(BrokerAddress.parse("mqtt://127.0.0.1:1"), engine)  # never started
    yield worker
    engine.dispose()


def _window(device_id: str, seq: int, *, shift: float = 0.0, rows: int = 3000,
            version: int = 1, extra: list[FeatureHistogram] | None = None) -> DriftMessage:
    rng = np.random.default_rng(seq * 1000 + hash(device_id) % 1000)
    features = []
    for index, histogram in enumerate(BASELINE.features[:len(FEATURES)]):
        values = rng.normal(size=rows) + (shift if index == 1 else 0.0)
        counts = live_counts(np.array(histogram.edges), values).tolist()
        features.append(FeatureHistogram(feature=histogram.feature, counts=counts))
    classes = rng.choice(3, size=rows, p=[0.3, 0.3, 0.4])
    features.append(FeatureHistogram(feature="output:y.class", counts=live_counts(
        np.array([0.0, 1, 2, 3]), classes.astype(float)).tolist()))
    return DriftMessage(device_id=device_id, seq=seq, sent_at=utcnow(),
                        model=ActiveModel(name="detector", version=version),
                        features=features + (extra or []), rows=rows,
                        window_started_at=utcnow())


def _send(writer, *messages: DriftMessage) -> list[str]:
    acked: list[str] = []
    writer._handle_batch([
        Inbound(topic(m.device_id, "drift"), encode(m), False,
                lambda m=m: acked.append(f"{m.device_id}/{m.seq}"))
        for m in messages])
    return acked


def _alerts(engine) -> list[DriftAlert]:
    with Session(engine) as session:
        return list(session.exec(select(DriftAlert).order_by(DriftAlert.id)))


def test_a_shifted_feature_raises_one_alert_naming_it_and_a_redelivery_changes_nothing(writer):
    shifted = _window("cam-1", 10, shift=0.8)
    acked = _send(writer, shifted, _window("cam-2", 10), shifted)
    assert sorted(acked) == ["cam-1/10", "cam-1/10", "cam-2/10"]
    (alert,) = _alerts(writer.engine)
    assert (alert.device_id, alert.model, alert.version) == ("cam-1", "detector", 1)
    assert alert.features == ["x[1]"] and alert.cleared_at is None and alert.score > 1
    with Session(writer.engine) as session:
        assert len(session.exec(select(DriftWindowRow)).all()) == 2  # cam-1's copy once
        (entry,) = session.exec(select(AuditEntry).where(
            AuditEntry.action == "drift.raised")).all()
        assert entry.subject == "device:cam-1" and entry.details["features"] == ["x[1]"]
        assert entry.details["statistics"]["x[1]"]["psi"] > 0.2
        view = fleet_view(session, model="detector", since=utcnow().replace(year=2000))
    assert [item["device_id"] for item in view] == ["cam-1"]
    assert writer.metrics.snapshot()["drift_alerts"] == {"raised": 1}


def test_alerts_clear_only_below_the_clear_level(writer):
    _send(writer, _window("cam-1", 1, shift=0.8))
    # A window between the clear level and the threshold keeps the alert open...
    _send(writer, _window("cam-1", 2, shift=0.45))
    (alert,) = _alerts(writer.engine)
    assert alert.cleared_at is None, alert.score
    # ... one back in distribution clears it, with an audit entry.
    _send(writer, _window("cam-1", 3))
    (alert,) = _alerts(writer.engine)
    assert alert.cleared_at is not None and alert.score < 0.8
    assert writer.metrics.snapshot()["drift_alerts"] == {"raised": 1, "cleared": 1}


def test_a_window_too_small_to_judge_is_stored_without_statistics_and_moves_no_alert(writer):
    _send(writer, _window("cam-1", 1, shift=2.0, rows=500))
    assert _alerts(writer.engine) == []
    with Session(writer.engine) as session:
        (row,) = session.exec(select(DriftWindowRow)).all()
    assert row.score is None and row.features["x[1]"][:5] == [None] * 5
    assert row.features["x[1]"][5] == 500


def test_hostile_features_are_left_out_and_cost_neither_their_window_nor_batch_mates(writer):
    bogus = [
        FeatureHistogram(feature="not-in-baseline", counts=[5] * 23),
        FeatureHistogram(feature="x[0]", counts=[1] * 7),  # twice, and the wrong layout
    ]
    wrong_layout = _window("cam-1", 1, shift=0.8)
    wrong_layout.features[2] = FeatureHistogram(feature="x[2]", counts=[100] * 5)
    unknown_model = DriftMessage(
        device_id="cam-3", seq=1, sent_at=utcnow(),
        model=ActiveModel(name="unpublished", version=4),
        features=[FeatureHistogram(feature="x[0]", counts=[1, 2, 3])], rows=6)
    acked = _send(writer, wrong_layout, _window("cam-2", 1, extra=bogus), unknown_model)
    assert sorted(acked) == ["cam-1/1", "cam-2/1", "cam-3/1"]
    with Session(writer.engine) as session:
        rows = {r.device_id: r for r in session.exec(select(DriftWindowRow))}
    assert set(rows["cam-1"].features) == {"x[0]", "x[1]", "output:y.class"}  # x[2] left out
    assert set(rows["cam-2"].features) == {*FEATURES, "output:y.class"}
    assert rows["cam-3"].score is None and rows["cam-3"].features == {}  # no baseline
    (alert,) = _alerts(writer.engine)  # cam-1's shift still judged on what was valid
    assert alert.device_id == "cam-1" and alert.features == ["x[1]"]
    assert writer.metrics.snapshot()["rejected"] == {}


def test_thresholds_come_from_the_defaults_then_the_bundle_then_the_operator(writer):
    bundle = DriftThresholdSpec(psi=0.5, js=0.3)
    layered = DriftSettings.layered(bundle, {"js": 0.25, "min_rows": 100,
                                             "reduction": "mean"})
    assert (layered.thresholds.psi, layered.thresholds.js, layered.thresholds.wasserstein) \
        == (0.5, 0.25, 0.1)
    assert layered.min_rows == 100 and layered.score.reduction.value == "mean"
    for bad, named in (({"bogus": 1}, "unknown drift setting 'bogus'"),
                       ({"psi": -1}, "psi must be > 0"),
                       ({"psi": "x"}, "psi must be a number"),
                       ({"min_rows": 0}, "min_rows"),
                       ({"reduction": "median"}, "reduction"),
                       ({"weights": {"x[0]": -2}}, "weight of 'x[0]'")):
        with pytest.raises(DriftConfigError, match=re.escape(named)):
            check_operator_settings(bad)
    # An operator who raises the thresholds far enough silences the shifted device.
    with Session(writer.engine) as session:
        set_settings(session, "detector", {"psi": 50, "js": 1, "wasserstein": 100},
                     "operator:test", "too noisy")
    _send(writer, _window("cam-1", 1, shift=0.8))
    assert _alerts(writer.engine) == []


def test_rebinning_keeps_mass_and_identical_distributions_stay_close():
    rng = np.random.default_rng(5)
    a = rng.normal(size=100_000)
    edges_a = np.quantile(a, np.linspace(0, 1, 21))
    edges_b = np.quantile(rng.normal(size=100_000), np.linspace(0, 1, 11))
    counts_b = live_counts(edges_b, rng.normal(size=20_000))
    moved = rebin(counts_b, edges_b, edges_a)
    assert moved.sum() == pytest.approx(counts_b.sum())
    np.testing.assert_allclose(rebin(counts_b, edges_b, edges_b), counts_b, atol=1.0)
    before = {"output:s": live_counts(edges_a, rng.normal(size=20_000)).astype(float)}
    same, feature = output_shift(before, {"output:s": edges_a}, {"output:s": counts_b},
                                 {"output:s": edges_b}, min_rows=1000)
    shifted_counts = live_counts(edges_b, rng.normal(size=20_000) + 1.0).astype(float)
    far, _ = output_shift(before, {"output:s": edges_a}, {"output:s": shifted_counts},
                          {"output:s": edges_b}, min_rows=1000)
    print(f"JS same distribution, other edges: {same:.3f}; shifted by 1 sigma: {far:.3f}")
    assert feature == "output:s" and same < 0.05 and far > 0.3
    assert output_shift(before, {"output:s": edges_a}, {"output:s": counts_b},
                        {"output:s": edges_b}, min_rows=50_000) == (None, None)
