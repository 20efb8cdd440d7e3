"""Drift in the database: judging windows as they are ingested, alerts, history, settings.

The ingest calls :func:`apply_drift` inside its batch transaction (the devices' rows are
locked by then, so two workers never step the same device's alert at once). Each message
is judged against its bundle's baseline (:mod:`fleet.drift.judge`), stored once per
(device, seq), and moves the device's alert for that model:

* no open alert and a score above 1 (some statistic above its threshold): raised, with
  the features that cross, an audit entry ``drift.raised`` and a webhook notice queued;
* an open alert and a score below the model's ``clear_ratio``: cleared (``drift.cleared``);
  between the two the alert stays as it is (hysteresis); a window that is too small to
  judge changes nothing.

One alert per (device, model name) at a time: a new version of the model keeps the alert
open if it drifts too (the alert records the version it last saw).

Storage: a window row holds six numbers per feature as JSON, about 60 bytes a feature plus
~150 for the row: 32 features every 5 minutes is ~600 KB per device per day before the
database's own overhead; :func:`delete_older_than` prunes windows with the heartbeats'
retention (alerts are kept).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from agent.contract import DriftMessage, utcnow
from fleet import audit
from fleet.drift.compare import OUTPUT_PREFIX
from fleet.drift.judge import (
    STORED_FIELDS,
    DriftSettings,
    PreparedBaseline,
    Verdict,
    check_operator_settings,
    judge,
)
from fleet.models import DriftAlert, DriftPolicy, DriftWindowRow, _as_utc
from fleet.registry import find_baseline

__all__ = [
    "AlertNote",
    "DriftPolicy",
    "apply_drift",
    "delete_older_than",
    "device_history",
    "fleet_view",
    "get_settings",
    "set_settings",
]

log = logging.getLogger(__name__)

ACTOR = "fleet:drift"
_CACHE_SIZE = 64


class _BaselineCache:
    """Prepared baselines by (model, version): immutable once published, so kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int], PreparedBaseline | None] = OrderedDict()

    def get(self, session: Session, name: str, version: int) -> PreparedBaseline | None:
        key = (name, version)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        baseline = find_baseline(session, name, version)
        prepared = PreparedBaseline(baseline) if baseline is not None else None
        if prepared is not None:  # a bundle published later may still bring one
            with self._lock:
                self._items[key] = prepared
                while len(self._items) > _CACHE_SIZE:
                    self._items.popitem(last=False)
        return prepared


_baselines = _BaselineCache()


@dataclass(frozen=True)
class AlertNote:
    """An alert that changed in this batch (for logs and metrics, after the commit)."""

    change: str  # "raised" or "cleared"
    device_id: str
    model: str
    version: int
    score: float
    features: tuple[str, ...]


def _policy_row(session: Session, model: str) -> DriftPolicy | None:
    return session.get(DriftPolicy, model)


def get_settings(session: Session, model: str, version: int | None = None) -> DriftSettings:
    """The settings in force for a model: defaults, the bundle's (of ``version``, else
    the newest with a baseline), the operator's."""
    bundle = None
    if version is not None:
        prepared = _baselines.get(session, model, version)
        bundle = prepared.thresholds if prepared is not None else None
    row = _policy_row(session, model)
    return DriftSettings.layered(bundle, row.settings if row is not None else {})


def set_settings(session: Session, model: str, settings: dict[str, Any], actor: str,
                 reason: str) -> DriftPolicy:
    """Replace an operator's settings for ``model`` (an empty object: back to the
    defaults); refused with a named :class:`~fleet.drift.stats.DriftConfigError`."""
    checked = check_operator_settings(settings)
    DriftSettings.layered(None, checked)  # every value usable together
    row = _policy_row(session, model) or DriftPolicy(model=model)
    before = dict(row.settings or {})
    row.settings = checked
    row.updated_at = utcnow()
    row.updated_by = actor[:200]
    session.add(row)
    audit.record(session, actor, "drift.settings", f"model:{model}", reason,
                 {"before": before, "after": checked})
    session.commit()
    session.refresh(row)
    return row


def apply_drift(session: Session, messages: list[DriftMessage], *, notify: bool
                ) -> list[AlertNote]:
    """Judge and store a batch's drift messages (see the module docstring); the caller
    commits. ``notify``: a webhook is configured, so changed alerts wait for it."""
    if not messages:
        return []
    seen = _stored_seqs(session, messages)
    settings_of: dict[tuple[str, int], DriftSettings] = {}
    notes: list[AlertNote] = []
    for message in sorted(messages, key=lambda m: (m.device_id, m.seq)):
        if (message.device_id, message.seq) in seen:
            continue  # a redelivered copy
        seen.add((message.device_id, message.seq))
        model, version = message.model.name, message.model.version
        prepared = _baselines.get(session, model, version)
        verdict = None
        if prepared is not None:
            key = (model, version)
            if key not in settings_of:
                row = _policy_row(session, model)
                settings_of[key] = DriftSettings.layered(
                    prepared.thresholds, row.settings if row is not None else {})
            verdict = judge(prepared, message.features, settings_of[key])
            if verdict.refused:
                log.warning("drift window of %s (%s v%d): %d feature(s) left out: %s",
                            message.device_id, model, version, len(verdict.refused),
                            "; ".join(verdict.refused[:3]))
        session.add(DriftWindowRow(
            device_id=message.device_id, seq=message.seq, model=model, version=version,
            window_started_at=message.window_started_at, window_ended_at=message.sent_at,
            rows=message.rows, score=verdict.score if verdict else None,
            features={v.feature: v.stored() for v in verdict.features} if verdict else {},
            output_counts={h.feature: list(h.counts) for h in message.features
                           if h.feature.startswith(OUTPUT_PREFIX)} or None,
        ))
        if verdict is not None and verdict.score is not None:
            note = _step_alert(session, message, verdict, settings_of[(model, version)],
                               notify)
            if note is not None:
                notes.append(note)
    return notes


def _stored_seqs(session: Session, messages: list[DriftMessage]) -> set[tuple[str, int]]:
    devices = {m.device_id for m in messages}
    seqs = {m.seq for m in messages}
    rows = session.exec(select(DriftWindowRow.device_id, DriftWindowRow.seq).where(
        col(DriftWindowRow.device_id).in_(devices), col(DriftWindowRow.seq).in_(seqs)))
    return {(device_id, seq) for device_id, seq in rows}


def _open_alert(session: Session, device_id: str, model: str) -> DriftAlert | None:
    return session.exec(select(DriftAlert).where(
        DriftAlert.device_id == device_id, DriftAlert.model == model,
        col(DriftAlert.cleared_at).is_(None))).first()


def _step_alert(session: Session, message: DriftMessage, verdict: Verdict,
                settings: DriftSettings, notify: bool) -> AlertNote | None:
    score = verdict.score
    assert score is not None
    model, version = message.model.name, message.model.version
    alert = _open_alert(session, message.device_id, model)
    at = message.sent_at
    crossing = verdict.crossing
    if alert is None:
        if score <= 1.0:
            return None
        alert = DriftAlert(
            device_id=message.device_id, model=model, version=version, raised_at=at,
            last_window_at=at, score=score, peak_score=score, features=crossing,
            notice_pending=notify, notice_next_at=utcnow() if notify else None,
        )
        session.add(alert)
        change = "raised"
    elif score < settings.thresholds.clear_ratio:
        alert.cleared_at = at
        alert.score = score
        alert.last_window_at = at
        alert.version = version
        if notify:
            alert.notice_pending, alert.notice_next_at = True, utcnow()
            alert.notice_attempts = 0
        session.add(alert)
        change = "cleared"
    else:
        alert.score = score
        alert.peak_score = max(alert.peak_score, score)
        alert.last_window_at = at
        alert.version = version
        if crossing:
            alert.features = crossing
        session.add(alert)
        return None
    features = tuple(alert.features)
    audit.record(
        session, ACTOR, f"drift.{change}", f"device:{message.device_id}",
        f"{model} v{version}: score {score:.2f}"
        + (f" on {', '.join(features[:5])}" if change == "raised" else ""),
        {"model": model, "version": version, "score": score, "features": list(features),
         "window_ended_at": at.isoformat(),
         "statistics": {v.feature: dict(zip(STORED_FIELDS, v.stored(), strict=True))
                        for v in verdict.features if v.feature in features[:8]}},
    )
    return AlertNote(change, message.device_id, model, version, score, features)


# --- reading ----------------------------------------------------------------------------


def output_counts(session: Session, device_id: str, model: str, version: int,
                  since: datetime | None = None, limit: int = 288) -> dict[str, np.ndarray]:
    """A device's output counts for one bundle version, summed over its latest ``limit``
    windows (ended after ``since``)."""
    rows = session.exec(select(DriftWindowRow.output_counts).where(
        DriftWindowRow.device_id == device_id, DriftWindowRow.model == model,
        DriftWindowRow.version == version,
        *([DriftWindowRow.window_ended_at >= since] if since is not None else []),
    ).order_by(col(DriftWindowRow.id).desc()).limit(limit)).all()
    totals: dict[str, np.ndarray] = {}
    for counts in rows:
        for feature, values in (counts or {}).items():
            array = np.asarray(values, dtype=np.float64)
            if feature in totals and totals[feature].shape != array.shape:
                continue  # not the layout its baseline has; the judge refused it too
            totals[feature] = totals.get(feature, 0) + array
    return totals


def output_edges(session: Session, model: str, version: int) -> dict[str, np.ndarray]:
    """The output features' edges in a bundle's baseline (empty: it has none)."""
    prepared = _baselines.get(session, model, version)
    if prepared is None:
        return {}
    found = {name: prepared.edges_of(name) for name in prepared.features
             if name.startswith(OUTPUT_PREFIX)}
    return {name: edges for name, edges in found.items() if edges is not None}


def alert_public(alert: DriftAlert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "device_id": alert.device_id,
        "model": alert.model,
        "version": alert.version,
        "state": "open" if alert.cleared_at is None else "cleared",
        "raised_at": _utc(alert.raised_at),
        "cleared_at": _utc(alert.cleared_at),
        "last_window_at": _utc(alert.last_window_at),
        "score": alert.score,
        "peak_score": alert.peak_score,
        "features": list(alert.features),
    }


def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    at = _as_utc(value)
    assert at is not None
    return at.isoformat()


def window_public(row: DriftWindowRow, feature: str | None = None) -> dict[str, Any]:
    features = {
        name: dict(zip(STORED_FIELDS, values, strict=False))
        for name, values in (row.features or {}).items()
        if feature is None or name == feature
    }
    return {
        "seq": row.seq,
        "model": row.model,
        "version": row.version,
        "window_started_at": _utc(row.window_started_at),
        "window_ended_at": _utc(row.window_ended_at),
        "rows": row.rows,
        "score": row.score,
        "features": features,
    }


def fleet_view(session: Session, *, model: str | None, since: datetime,
               drifting_only: bool = True, limit: int = 1000) -> list[dict[str, Any]]:
    """Per device (and model): its latest window since ``since`` and its alert, the most
    drifted first. ``drifting_only``: only devices with an alert open at some time since
    ``since`` (the fleet's answer to "who drifts, on what, since when")."""
    alerts = session.exec(select(DriftAlert).where(
        (col(DriftAlert.cleared_at).is_(None)) | (col(DriftAlert.cleared_at) >= since),
        *([DriftAlert.model == model] if model else []),
    ).order_by(col(DriftAlert.id).desc())).all()
    alert_of: dict[tuple[str, str], DriftAlert] = {}
    for alert in alerts:
        alert_of.setdefault((alert.device_id, alert.model), alert)  # the newest
    latest_ids = select(func.max(DriftWindowRow.id)).where(
        DriftWindowRow.window_ended_at >= since,
        *([DriftWindowRow.model == model] if model else []),
    ).group_by(DriftWindowRow.device_id, DriftWindowRow.model)
    latest = {
        (row.device_id, row.model): row
        for row in session.exec(select(DriftWindowRow).where(
            col(DriftWindowRow.id).in_(latest_ids)))
    }
    keys = set(alert_of) if drifting_only else set(alert_of) | set(latest)
    items = []
    for key in keys:
        alert, window = alert_of.get(key), latest.get(key)
        items.append({
            "device_id": key[0],
            "model": key[1],
            "version": window.version if window else alert.version if alert else None,
            "drifting": alert is not None and alert.cleared_at is None,
            "score": window.score if window else None,
            "alert": alert_public(alert) if alert else None,
            "latest_window": window_public(window) if window else None,
        })
    items.sort(key=lambda item: (-(item["score"] or 0.0), item["device_id"]))
    return items[:limit]


def device_history(session: Session, device_id: str, *, since: datetime,
                   feature: str | None = None, limit: int = 500) -> dict[str, Any]:
    """A device's windows since ``since`` (newest first) and its alerts."""
    rows = session.exec(select(DriftWindowRow).where(
        DriftWindowRow.device_id == device_id, DriftWindowRow.window_ended_at >= since,
    ).order_by(col(DriftWindowRow.window_ended_at).desc(), col(DriftWindowRow.id).desc())
        .limit(limit)).all()
    alerts = session.exec(select(DriftAlert).where(DriftAlert.device_id == device_id)
                          .order_by(col(DriftAlert.id).desc()).limit(100)).all()
    return {
        "device_id": device_id,
        "alerts": [alert_public(a) for a in alerts],
        "windows": [window_public(row, feature) for row in rows],
    }


def delete_older_than(session: Session, cutoff: datetime, batch: int = 10_000) -> int:
    """Prune drift windows received before ``cutoff``, in batches (short transactions)."""
    deleted = 0
    while True:
        ids = select(DriftWindowRow.id).where(
            DriftWindowRow.received_at < cutoff).limit(batch)
        result = session.execute(delete(DriftWindowRow).where(col(DriftWindowRow.id).in_(ids)))
        session.commit()
        deleted += result.rowcount or 0
        if not result.rowcount or result.rowcount < batch:
            return deleted
