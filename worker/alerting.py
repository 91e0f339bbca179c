"""Turning checks into alerts: a failing check fires one notification, reminds again once per cooldown while it keeps
failing, and sends a resolved message when it passes again. Shared by `check_alerts` and `check_system_health`, keyed
by the check's name, so the two never alert twice about the same thing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg

from db.queries.alerts import AlertState, alert_states, lock_alerts, save_alert_state, transaction_now
from db.queries.notifications import NewNotification, Severity
from salesdash.config import Settings
from worker.health import HealthCheck
from worker.mail import Document, render_html, render_text
from worker.outbox import notify

CRITICAL = ("postgres_reachable", "redis_reachable", "order_partitions_ahead")


def _note(check: HealthCheck, kind: str, subject: str, dedupe_key: str) -> NewNotification:
    document = Document(title=subject, paragraphs=[check.detail])
    severity: Severity = "info" if check.ok else ("critical" if check.check in CRITICAL else "warning")
    return NewNotification(
        kind, severity, subject, render_text(document), render_html(document),
        {"check": check.check, "ok": check.ok, "detail": check.detail, "values": check.values}, dedupe_key,
    )  # fmt: skip


async def _one(
    conn: asyncpg.Connection, settings: Settings, check: HealthCheck, state: AlertState | None, now: datetime
) -> int | None:
    key = check.check
    if check.ok:
        if state is None or not state.firing:
            return None
        note = _note(check, "alert_resolved", f"Resolved: {key}", f"alert_resolved:{key}:{state.since.isoformat()}")
        await save_alert_state(conn, key, False, now, check.detail)
        return await notify(conn, settings, note)
    if state is None or not state.firing:
        note = _note(check, "alert", f"Alert: {key}", f"alert:{key}:{now.isoformat()}")
        await save_alert_state(conn, key, True, now, check.detail)
        return await notify(conn, settings, note)
    if now - state.last_notified_at < timedelta(seconds=settings.alert_cooldown_s):
        return None  # still failing, already said so within the cooldown
    note = _note(check, "alert", f"Still failing: {key}", f"alert:{key}:{now.isoformat()}")
    await save_alert_state(conn, key, True, state.since, check.detail)
    return await notify(conn, settings, note)


async def raise_alerts(conn: asyncpg.Connection, settings: Settings, checks: Sequence[HealthCheck]) -> list[int]:
    """Record the notifications these checks call for, in one transaction; returns the new notifications' ids."""
    recorded = []
    async with conn.transaction():
        await lock_alerts(conn)
        states, now = await alert_states(conn, [c.check for c in checks]), await transaction_now(conn)
        for check in checks:
            notification_id = await _one(conn, settings, check, states.get(check.check), now)
            if notification_id is not None:
                recorded.append(notification_id)
    return recorded
