"""Drift alerts to an operator's webhook (a retraining hook), never in the ingest's way.

The ingest only marks an alert that was raised or cleared as ``notice_pending`` in the
same transaction that changed it; this thread delivers pending notices afterwards. The
database is the outbox: a fleet that stops (or a receiver that is down for a day) delivers
what is pending when it can, nothing is lost, nothing waits in memory.

Each notice is claimed before it is sent (its ``notice_next_at`` moved forward with a
compare-and-set), so fleet workers sharing a database do not send it twice at once;
delivery is still at-least-once (a worker may die after the POST and before recording it),
and receivers dedupe by the ``X-Edgefleet-Delivery`` header. A receiver that keeps failing
is retried with a growing pause (up to an hour); one that refuses a notice outright (a
4xx other than 408/429) is not asked again for it, and the refusal is logged.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agent.contract import utcnow
from fleet.drift.store import alert_public
from fleet.drift.webhook import WebhookSender, WebhookTarget
from fleet.models import DriftAlert

__all__ = ["DriftNotifier"]

log = logging.getLogger(__name__)

CLAIM_S = 300.0  # a claimed notice is free again after this (its worker died)
RETRY_MAX_S = 3600.0
BATCH = 50


def notice_payload(alert: DriftAlert) -> dict[str, Any]:
    """What the receiver gets: the alert as the API shows it, and what changed."""
    state = "raised" if alert.cleared_at is None else "cleared"
    return {"type": f"drift.{state}", "alert": alert_public(alert)}


class DriftNotifier:
    def __init__(self, engine: Engine, target: WebhookTarget,
                 sender: WebhookSender | None = None, poll_s: float = 5.0) -> None:
        self.engine = engine
        self.target = target
        self.sender = sender or WebhookSender()
        self.poll_s = poll_s
        self.delivered = 0
        self.failed = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drift-webhook", daemon=True)

    def start(self) -> DriftNotifier:
        self._thread.start()
        return self

    def wake(self) -> None:
        """An alert changed: look now, not at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.sender.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while self.deliver_due() and not self._stop.is_set():
                    pass
            except Exception:
                log.exception("drift notices: delivery pass failed; trying again")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def deliver_due(self) -> int:
        """Send the notices due now; returns how many were tried."""
        now = utcnow()
        with Session(self.engine) as session:
            due = session.exec(select(DriftAlert).where(
                col(DriftAlert.notice_pending).is_(True), col(DriftAlert.notice_next_at) <= now,
            ).order_by(col(DriftAlert.id)).limit(BATCH)).all()
            session.expunge_all()
        tried = 0
        for alert in due:
            if self._stop.is_set():
                break
            if not self._claim(alert):
                continue  # another worker has it
            tried += 1
            self._deliver(alert)
        return tried

    def _claim(self, alert: DriftAlert) -> bool:
        with Session(self.engine) as session:
            result = session.execute(update(DriftAlert).where(
                col(DriftAlert.id) == alert.id,
                col(DriftAlert.notice_next_at) == alert.notice_next_at,
                col(DriftAlert.notice_pending).is_(True),
            ).values(notice_next_at=utcnow() + timedelta(seconds=CLAIM_S)))
            session.commit()
        return result.rowcount == 1

    def _deliver(self, alert: DriftAlert) -> None:
        payload = notice_payload(alert)
        state = "raised" if alert.cleared_at is None else "cleared"
        result = self.sender.deliver(self.target, f"drift-alert-{alert.id}-{state}", payload,
                                     stop=self._stop)
        with Session(self.engine) as session:
            row = session.get(DriftAlert, alert.id)
            if row is None:
                return
            if (row.cleared_at is None) != (alert.cleared_at is None):
                # Changed while we sent: the newer state is pending, due now.
                row.notice_next_at = utcnow()
            elif result.delivered:
                row.notice_pending = False
                row.notices_sent += 1
                row.notice_error = None
                self.delivered += 1
            elif result.permanent:
                row.notice_pending = False
                row.notice_error = f"refused by the receiver: {result.error}"[:300]
                self.failed += 1
                log.error("drift webhook refused the notice of alert %s (%s): not retried",
                          alert.id, result.error)
            else:
                row.notice_attempts += result.attempts
                row.notice_error = (result.error or "not delivered")[:300]
                pause = min(RETRY_MAX_S, 30.0 * 2 ** min(row.notice_attempts // 6, 7))
                row.notice_next_at = utcnow() + timedelta(seconds=pause)
                self.failed += 1
                log.warning("drift webhook: alert %s not delivered (%s); next try in %.0f s",
                            alert.id, result.error, pause)
            session.add(row)
            session.commit()
