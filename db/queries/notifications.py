"""The notifications outbox: a notification and its deliveries are written in the caller's transaction (with the facts
they report), then each delivery is claimed by one worker, sent, and its outcome recorded with its history.

Never twice: `dedupe_key` is unique, so recording the same report or alert again writes nothing; a delivery is claimed
(state `sending`, a lease) with FOR UPDATE SKIP LOCKED, so two workers never take the same one. A worker that dies
after claiming leaves the lease to expire, and the next claim sends it again with the same `message_id`: the one
window SMTP cannot close (the server accepted, we had not yet recorded it) resends at most that delivery, marked so
the receiver can deduplicate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel

Channel = Literal["email", "webhook"]
Severity = Literal["info", "warning", "critical"]
DeliveryState = Literal["pending", "sending", "sent", "given_up"]
NotificationStatus = Literal["pending", "sent", "failed", "skipped"]
KINDS = ("low_stock", "daily_summary", "weekly_report", "alert", "alert_resolved")
# what `GET /notifications?state=` matches: a notification's status or one of its deliveries' states
STATES = ("pending", "sending", "sent", "given_up", "failed", "skipped")


@dataclass(frozen=True)
class NewNotification:
    kind: str  # low_stock, daily_summary, weekly_report, alert, alert_resolved, health_check
    severity: Severity
    subject: str
    text: str
    html: str
    payload: dict[str, Any]
    dedupe_key: str  # e.g. daily_summary:2026-11-22


@dataclass(frozen=True)
class Recipient:
    channel: Channel
    recipient: str  # an address, or a webhook's name


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    notification_id: int
    channel: Channel
    recipient: str
    message_id: str
    attempt: int  # this attempt's number, from 1
    kind: str
    severity: Severity
    subject: str
    text: str
    html: str | None
    payload: dict[str, Any]
    created_at: datetime


_INSERT = """
INSERT INTO notifications (kind, severity, subject, body, html_body, payload, dedupe_key, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $8 THEN 'pending' ELSE 'skipped' END)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id"""

# The Message-ID is made once, here: every attempt of this delivery carries the same one.
_INSERT_DELIVERIES = """
INSERT INTO notification_deliveries (notification_id, channel, recipient, message_id)
SELECT $1, r.channel, r.recipient, format('<%s@salesdash>', gen_random_uuid())
  FROM unnest($2::text[], $3::text[]) AS r (channel, recipient)"""


async def record_notification(
    conn: asyncpg.Connection, note: NewNotification, recipients: Sequence[Recipient]
) -> int | None:
    """Write a notification and one delivery per recipient; None when its dedupe key was recorded already. Call it
    inside the transaction that writes the facts it reports."""
    async with conn.transaction():
        notification_id: int | None = await conn.fetchval(
            _INSERT,
            note.kind,
            note.severity,
            note.subject,
            note.text,
            note.html,
            json.loads(json.dumps(note.payload, default=str)),  # dates and decimals as strings
            note.dedupe_key,
            bool(recipients),
        )
        if notification_id is not None and recipients:
            await conn.execute(
                _INSERT_DELIVERIES, notification_id, [r.channel for r in recipients], [r.recipient for r in recipients]
            )
    return notification_id


# Due: pending and its time has come, or `sending` under a lease that ran out (its worker died).
_CLAIM = """
WITH due AS (
    SELECT id FROM notification_deliveries
     WHERE channel = $1
       AND ((state = 'pending' AND next_attempt_at <= now()) OR (state = 'sending' AND lease_until < now()))
       AND ($4::bigint[] IS NULL OR notification_id = ANY($4::bigint[]))
     ORDER BY next_attempt_at, id
     LIMIT $2
       FOR UPDATE SKIP LOCKED)
UPDATE notification_deliveries d
   SET state = 'sending', attempts = d.attempts + 1, lease_until = now() + make_interval(secs => $3)
  FROM due, notifications n
 WHERE d.id = due.id AND n.id = d.notification_id
RETURNING d.id, d.notification_id, d.channel, d.recipient, d.message_id, d.attempts AS attempt,
          n.kind, n.severity, n.subject, n.body AS text, n.html_body AS html, n.payload, n.created_at"""


async def claim_deliveries(
    conn: asyncpg.Connection, channel: Channel, limit: int, lease_s: float, notification_ids: Sequence[int] | None
) -> list[ClaimedDelivery]:
    rows = await conn.fetch(
        _CLAIM, channel, limit, lease_s, None if notification_ids is None else list(notification_ids)
    )
    claimed = [ClaimedDelivery(**dict(r)) for r in rows]
    return sorted(claimed, key=lambda d: d.id)


_FINISH_DELIVERY = """
UPDATE notification_deliveries
   SET state = $2, last_error = $3, lease_until = NULL,
       next_attempt_at = coalesce($4, next_attempt_at),
       sent_at = CASE WHEN $2 = 'sent' THEN now() END
 WHERE id = $1 AND state = 'sending'
RETURNING notification_id, attempts"""

# A notification is done once none of its deliveries waits: failed when one gave up, else sent.
_SUMMARISE = """
UPDATE notifications n
   SET status = CASE WHEN s.given_up THEN 'failed' ELSE 'sent' END, finished_at = now()
  FROM (SELECT bool_or(state = 'given_up') AS given_up, bool_or(state IN ('pending', 'sending')) AS waiting
          FROM notification_deliveries WHERE notification_id = $1) s
 WHERE n.id = $1 AND NOT s.waiting"""


async def record_attempt(
    conn: asyncpg.Connection,
    delivery: ClaimedDelivery,
    state: Literal["sent", "pending", "given_up"],
    error: str | None,
    retry_at: datetime | None,
) -> None:
    """The outcome of one attempt: the delivery's new state, a line of its history, and its notification's status."""
    async with conn.transaction():
        # the notification's row first: two deliveries finishing at once summarise it one after the other
        await conn.execute("SELECT 1 FROM notifications WHERE id = $1 FOR UPDATE", delivery.notification_id)
        row = await conn.fetchrow(_FINISH_DELIVERY, delivery.id, state, error, retry_at)
        if row is None:  # taken over by another worker after our lease ran out: its outcome counts
            return
        await conn.execute(
            "INSERT INTO notification_delivery_events (delivery_id, attempt, state, error) VALUES ($1, $2, $3, $4)",
            delivery.id,
            row["attempts"],
            state,
            error,
        )
        await conn.execute(_SUMMARISE, delivery.notification_id)


# ------------------------------------------------------------------------------------------------------------
# Reading them back (GET /notifications)
# ------------------------------------------------------------------------------------------------------------


class DeliveryEvent(BaseModel):
    attempt: int
    state: str
    error: str | None
    at: datetime


class DeliveryView(BaseModel):
    id: int
    channel: Channel
    recipient: str
    message_id: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None  # when it will be tried again; null once sent or given up
    last_error: str | None
    sent_at: datetime | None
    history: list[DeliveryEvent]


class NotificationView(BaseModel):
    id: int
    kind: str
    severity: Severity
    subject: str
    dedupe_key: str
    status: NotificationStatus
    created_at: datetime
    finished_at: datetime | None
    deliveries: list[DeliveryView]


_LIST = """
SELECT n.id, n.kind, n.severity, n.subject, n.dedupe_key, n.status, n.created_at, n.finished_at,
       coalesce((
         SELECT jsonb_agg(jsonb_build_object(
                  'id', d.id, 'channel', d.channel, 'recipient', d.recipient, 'message_id', d.message_id,
                  'state', d.state, 'attempts', d.attempts,
                  'next_attempt_at', CASE WHEN d.state IN ('pending', 'sending') THEN d.next_attempt_at END,
                  'last_error', d.last_error, 'sent_at', d.sent_at,
                  'history', coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', e.attempt, 'state', e.state,
                                                                           'error', e.error, 'at', e.at) ORDER BY e.id)
                                         FROM notification_delivery_events e WHERE e.delivery_id = d.id), '[]'))
                  ORDER BY d.id)
           FROM notification_deliveries d
          WHERE d.notification_id = n.id), '[]') AS deliveries
  FROM notifications n
 WHERE ($1::text IS NULL OR n.kind = $1)
   AND ($2::text IS NULL OR n.status = $2
        OR EXISTS (SELECT 1 FROM notification_deliveries d WHERE d.notification_id = n.id AND d.state = $2))
 ORDER BY n.id DESC
 LIMIT $3"""


async def list_notifications(
    conn: asyncpg.Connection | asyncpg.Pool, *, kind: str | None, state: str | None, limit: int
) -> list[NotificationView]:
    """Newest first. `state` matches a notification's status or any of its deliveries' states."""
    rows = await conn.fetch(_LIST, kind, state, limit)
    return [NotificationView.model_validate(dict(r)) for r in rows]
