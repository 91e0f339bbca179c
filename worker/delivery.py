"""Sending what the outbox holds: e-mail over SMTP (one connection per batch; multipart text + HTML) and webhooks (JSON,
signed with HMAC-SHA256 over timestamp and body). Each channel runs its own loop, so a slow or broken one never holds
up the other; each attempt's outcome is recorded as soon as it is known, one delivery at a time, so a worker killed
mid-batch leaves at most the one in flight unrecorded (db/queries/notifications.py says what happens to it)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import aiosmtplib
import asyncpg
import httpx

from db.queries.notifications import Channel, ClaimedDelivery, claim_deliveries, record_attempt
from salesdash.config import Settings
from worker.channels import Channels, configured_channels, smtp_client

log = logging.getLogger(__name__)
# httpx logs every request's full URL at INFO, and a webhook URL often carries a token: keep its logger to warnings
logging.getLogger("httpx").setLevel(logging.WARNING)

BATCH = 10  # claimed at a time per channel: a batch finishes well within the lease
DELIVERY_HEADER = "X-Salesdash-Delivery"  # the same on every attempt of a delivery
TIMESTAMP_HEADER = "X-Salesdash-Timestamp"
SIGNATURE_HEADER = "X-Salesdash-Signature"  # sha256=<hex HMAC of "<timestamp>.<body>">
_SMTP_FAULTS = (OSError, TimeoutError, aiosmtplib.SMTPException)


class ChannelDown(Exception):
    """The channel itself failed (SMTP connection or login): the rest of the batch cannot go either."""


@dataclass
class DeliveryCounts:
    sent: int = 0
    retrying: int = 0
    given_up: int = 0
    errors: list[str] = field(default_factory=list)  # the distinct errors met, for the job result

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "retrying": self.retrying, "given_up": self.given_up, "errors": self.errors}


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def retry_delay_s(attempt: int, settings: Settings) -> float:
    """Exponential backoff with up to 10 % jitter, capped."""
    base: float = min(settings.notify_retry_base_s * 2.0 ** (attempt - 1), settings.notify_retry_cap_s)
    return base * (1 + random.random() / 10)


def email_message(delivery: ClaimedDelivery, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = delivery.recipient
    message["Subject"] = delivery.subject
    message["Message-ID"] = delivery.message_id
    message["Date"] = format_datetime(delivery.created_at)
    message.set_content(delivery.text)
    if delivery.html:
        message.add_alternative(delivery.html, subtype="html")
    return message


def webhook_body(delivery: ClaimedDelivery) -> bytes:
    document = {
        "delivery_id": delivery.message_id,
        "notification_id": delivery.notification_id,
        "kind": delivery.kind,
        "severity": delivery.severity,
        "subject": delivery.subject,
        "text": delivery.text,
        "payload": delivery.payload,
        "created_at": delivery.created_at.isoformat(),
    }
    return json.dumps(document, default=str, separators=(",", ":")).encode()


async def _record(
    conn: asyncpg.Connection, settings: Settings, delivery: ClaimedDelivery, error: str | None, counts: DeliveryCounts
) -> None:
    if error is None:
        await record_attempt(conn, delivery, "sent", None, None)
        counts.sent += 1
    elif delivery.attempt >= settings.notify_max_attempts:
        await record_attempt(conn, delivery, "given_up", error, None)
        counts.given_up += 1
    else:
        retry_at = datetime.now(UTC) + timedelta(seconds=retry_delay_s(delivery.attempt, settings))
        await record_attempt(conn, delivery, "pending", error, retry_at)
        counts.retrying += 1
    if error is not None:
        log.warning("delivery %s to %s attempt %s failed: %s", delivery.id, delivery.recipient, delivery.attempt, error)
        if error not in counts.errors:
            counts.errors.append(error)
    if settings.notify_pause_ms:
        await asyncio.sleep(settings.notify_pause_ms / 1000)


async def _send_emails(
    conn: asyncpg.Connection, settings: Settings, batch: Sequence[ClaimedDelivery], counts: DeliveryCounts
) -> None:
    smtp = smtp_client(settings)
    try:
        await smtp.connect()
    except _SMTP_FAULTS as exc:
        down = f"SMTP {settings.smtp_host}:{settings.smtp_port}: {type(exc).__name__}: {exc}"
        for delivery in batch:
            await _record(conn, settings, delivery, down, counts)
        raise ChannelDown(down) from None
    try:
        for delivery in batch:
            error: str | None = None
            try:
                await smtp.send_message(email_message(delivery, settings.smtp_from))
            except _SMTP_FAULTS as exc:
                error = f"SMTP: {type(exc).__name__}: {exc}"
            await _record(conn, settings, delivery, error, counts)
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except _SMTP_FAULTS:
                smtp.close()


async def _post(http: httpx.AsyncClient, settings: Settings, url: str, delivery: ClaimedDelivery) -> str | None:
    body = webhook_body(delivery)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery.message_id, TIMESTAMP_HEADER: timestamp}
    if settings.webhook_secret is not None:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret.get_secret_value(), timestamp, body)
    try:
        response = await http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:  # the message names the host, never the URL's path or query
        return f"webhook {delivery.recipient}: {type(exc).__name__}"
    if response.is_success:
        return None
    return f"webhook {delivery.recipient}: HTTP {response.status_code}"


async def _send_webhooks(
    conn: asyncpg.Connection,
    settings: Settings,
    channels: Channels,
    batch: Sequence[ClaimedDelivery],
    counts: DeliveryCounts,
) -> None:
    async with httpx.AsyncClient(timeout=settings.smtp_timeout_s, follow_redirects=False) as http:
        for delivery in batch:
            hook = channels.webhook(delivery.recipient)
            if hook is None:
                error: str | None = f"webhook {delivery.recipient} is no longer configured"
            else:
                error = await _post(http, settings, hook.url, delivery)
            await _record(conn, settings, delivery, error, counts)


async def _channel_loop(
    pool: asyncpg.Pool, settings: Settings, channel: Channel, notification_ids: Sequence[int] | None
) -> DeliveryCounts:
    """Claim and send this channel's due deliveries until none is due, or the channel itself fails."""
    counts, channels = DeliveryCounts(), configured_channels(settings)
    async with pool.acquire() as conn:
        while batch := await claim_deliveries(conn, channel, BATCH, settings.notify_lease_s, notification_ids):
            try:
                if channel == "email":
                    await _send_emails(conn, settings, batch, counts)
                else:
                    await _send_webhooks(conn, settings, channels, batch, counts)
            except ChannelDown:
                break  # the rest waits for the next run rather than each failing the same way now
    return counts


async def deliver_due(
    pool: asyncpg.Pool, settings: Settings, notification_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """Send every due delivery (or only those of `notification_ids`), both channels at once."""
    email, webhook = await asyncio.gather(
        _channel_loop(pool, settings, "email", notification_ids),
        _channel_loop(pool, settings, "webhook", notification_ids),
    )
    return {"email": email.as_dict(), "webhook": webhook.as_dict()}
