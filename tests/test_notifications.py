"""The notifications outbox against real receivers on loopback: an SMTP server that goes down and comes back, a webhook
receiver that verifies the signature and answers 500 before 200, a worker SIGKILLed in the middle of 50 deliveries,
the same summary recorded and sent by racing runs,
`GET /notifications`, and secrets that never reach a log or an API answer."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiosmtpd.smtp import AuthResult
from pydantic import SecretStr
from redis.asyncio import Redis

from db.queries.notifications import NewNotification
from salesdash.auth import OPERATOR
from salesdash.config import Settings, get_settings
from tests.conftest import wait_for
from tests.notify_servers import HOST, MailSink, WebhookReceiver, free_port, running_sink
from worker import client
from worker.delivery import SIGNATURE_HEADER, TIMESTAMP_HEADER, deliver_due
from worker.jobs.summaries import send_daily_summary
from worker.outbox import notify

SECRET = "whsec-Very-Secret-0123"
PASSWORD = "smtp-Pa55word-never-shown"
TOKEN = "url-token-never-shown"


@pytest.fixture(autouse=True)
async def quiet_outbox(db: asyncpg.Pool) -> AsyncIterator[None]:
    """Deliveries other tests left waiting must not reach this test's receivers (nor this test's theirs)."""
    retire = "UPDATE notification_deliveries SET state = 'given_up' WHERE state IN ('pending', 'sending')"
    await db.execute(retire)
    yield
    await db.execute(retire)


@pytest.fixture
def sink() -> Iterator[MailSink]:
    yield from running_sink()


def settings_for(**changes: Any) -> Settings:
    base = {"notify_retry_base_s": 0.05, "notify_retry_cap_s": 0.2, "smtp_timeout_s": 3.0}
    for secret in (
        "smtp_password",
        "webhook_secret",
        "webhook_urls",
    ):  # model_copy does not validate: wrap as the settings would
        if secret in changes:
            changes[secret] = SecretStr(changes[secret])
    return get_settings().model_copy(update={**base, **changes})


def note(key: str, subject: str = "Test notification") -> NewNotification:
    return NewNotification("alert", "warning", subject, "plain text body", "<p>html body</p>", {"n": 1}, key)


async def record(db: asyncpg.Pool, settings: Settings, key: str) -> int:
    async with db.acquire() as conn:
        notification_id = await notify(conn, settings, note(key))
    assert notification_id is not None
    return notification_id


async def deliveries(db: asyncpg.Pool, notification_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM notification_deliveries WHERE notification_id = $1 ORDER BY recipient", notification_id
    )


async def history(db: asyncpg.Pool, delivery_id: int) -> list[tuple[str, str | None]]:
    rows = await db.fetch(
        "SELECT state, error FROM notification_delivery_events WHERE delivery_id = $1 ORDER BY id", delivery_id
    )
    return [(r["state"], r["error"]) for r in rows]


async def deliver_until_done(db: asyncpg.Pool, settings: Settings, notification_id: int, rounds: int = 40) -> None:
    for _ in range(rounds):
        await deliver_due(db, settings, [notification_id])
        states = {r["state"] for r in await deliveries(db, notification_id)}
        if states <= {"sent", "given_up"}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"deliveries of {notification_id} still waiting: {states}")


async def test_smtp_down_then_back_delivers_once_and_the_history_shows_the_failures(db: asyncpg.Pool) -> None:
    port = free_port()  # nothing listens here yet
    settings = settings_for(
        smtp_host=HOST,
        smtp_port=port,
        alert_recipient="ann@example.com, bob@example.com",
        notify_retry_base_s=1.0,
        notify_retry_cap_s=2.0,
    )
    notification_id = await record(db, settings, "test:smtp-down")
    first = await deliver_due(db, settings, [notification_id])
    assert first["email"]["retrying"] == 2 and first["email"]["sent"] == 0
    down = await deliveries(db, notification_id)
    assert {r["state"] for r in down} == {"pending"} and all("SMTP" in r["last_error"] for r in down)
    again = await deliver_due(db, settings, [notification_id])  # before the backoff has passed: nothing is due
    assert again["email"] == {"sent": 0, "retrying": 0, "given_up": 0, "errors": []}

    sink = MailSink(port=port).start()
    try:
        await asyncio.sleep(1.2)  # past the backoff (1 s and up to 10 % jitter)
        await deliver_until_done(db, settings, notification_id)
        await deliver_due(db, settings)  # a later run finds nothing to send
    finally:
        sink.stop()
    assert sorted(r for m in sink.messages for r in m.recipients) == ["ann@example.com", "bob@example.com"]
    rows = await deliveries(db, notification_id)
    assert [r["state"] for r in rows] == ["sent", "sent"] and all(r["attempts"] == 2 for r in rows)
    for row in rows:
        events = await history(db, row["id"])
        assert [state for state, _ in events] == ["pending", "sent"] and "SMTP" in (events[0][1] or "")
        (mail,) = sink.to(row["recipient"])
        assert mail.message_id == row["message_id"]  # made once, when the notification was recorded
        assert mail.text.strip() == "plain text body"
        assert mail.html.strip() == "<p>html body</p>"
    status = await db.fetchval("SELECT status FROM notifications WHERE id = $1", notification_id)
    assert status == "sent"


async def test_a_webhook_is_signed_and_a_receiver_answering_500_gets_retries(db: asyncpg.Pool) -> None:
    with WebhookReceiver(statuses=[500, 500]) as receiver:
        url = f"{receiver.url}/hook?token={TOKEN}"
        settings = settings_for(webhook_urls=url, webhook_secret=SECRET)
        notification_id = await record(db, settings, "test:webhook")
        await deliver_until_done(db, settings, notification_id)
    assert len(receiver.posts) == 3
    (row,) = await deliveries(db, notification_id)
    assert row["state"] == "sent" and row["attempts"] == 3 and TOKEN not in row["recipient"]
    assert [s for s, _ in await history(db, row["id"])] == ["pending", "pending", "sent"]
    assert {p.headers["x-salesdash-delivery"] for p in receiver.posts} == {row["message_id"]}
    for post in receiver.posts:  # what a receiver does: recompute the signature over timestamp and body
        timestamp = post.headers[TIMESTAMP_HEADER.lower()].encode()
        expected = hmac.new(SECRET.encode(), timestamp + b"." + post.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(post.headers[SIGNATURE_HEADER.lower()], f"sha256={expected}")
        assert json.loads(post.body)["delivery_id"] == row["message_id"] and post.path == f"/hook?token={TOKEN}"
    forged = hmac.new(b"wrong secret", b"0." + receiver.posts[0].body, hashlib.sha256).hexdigest()
    assert receiver.posts[0].headers[SIGNATURE_HEADER.lower()] != f"sha256={forged}"


async def test_a_broken_channel_does_not_hold_up_the_other(db: asyncpg.Pool) -> None:
    with WebhookReceiver() as receiver:
        settings = settings_for(
            smtp_host=HOST, smtp_port=free_port(), webhook_urls=f"not a url,{receiver.url}/ok", webhook_secret=SECRET
        )
        notification_id = await record(db, settings, "test:broken-channel")
        result = await deliver_due(db, settings, [notification_id])
    assert result["webhook"]["sent"] == 1 and result["email"]["retrying"] == 1 and len(receiver.posts) == 1


async def test_secrets_stay_out_of_logs_and_api_answers(
    db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_: Any) -> AuthResult:
        return AuthResult(success=False, handled=False)

    for sink in running_sink(authenticator=refuse):
        with WebhookReceiver(statuses=[503]) as receiver:
            settings = settings_for(
                smtp_host=HOST, smtp_port=sink.port, smtp_username="ops", smtp_password=PASSWORD,
                webhook_urls=f"{receiver.url}/hook?token={TOKEN}", webhook_secret=SECRET,
            )  # fmt: skip
            notification_id = await record(db, settings, "test:secrets")
            with caplog.at_level(logging.DEBUG):
                result = await deliver_due(db, settings, [notification_id])
    assert result["email"]["retrying"] == 1 and result["webhook"]["retrying"] == 1
    assert "SMTP" in result["email"]["errors"][0]  # the refused login is named ...
    answer = await app_client.get("/notifications", params={"kind": "alert"}, headers=auth["read"])
    assert answer.status_code == 200 and any(n["id"] == notification_id for n in answer.json())
    exposed = answer.text + caplog.text + json.dumps(result) + repr(settings)
    for secret in (PASSWORD, SECRET, TOKEN):  # ... and no secret is
        assert secret not in exposed


async def test_get_notifications_filters_by_kind_and_state(
    db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], sink: MailSink
) -> None:
    settings = settings_for(smtp_host=HOST, smtp_port=sink.port, alert_recipient="ops@example.com")
    sent_id = await record(db, settings, "test:api-sent")
    await deliver_until_done(db, settings, sent_id)
    waiting_id = await record(db, settings, "test:api-waiting")

    async def listed(**params: str) -> list[dict[str, Any]]:
        response = await app_client.get("/notifications", params=params, headers=auth["read"])
        assert response.status_code == 200, response.text
        return list(response.json())

    sent = await listed(kind="alert", state="sent")
    assert sent_id in {n["id"] for n in sent} and waiting_id not in {n["id"] for n in sent}
    (shown,) = [n for n in sent if n["id"] == sent_id]
    (delivery,) = shown["deliveries"]
    assert delivery["recipient"] == "ops@example.com" and delivery["state"] == "sent" and delivery["attempts"] == 1
    assert [e["state"] for e in delivery["history"]] == ["sent"] and delivery["next_attempt_at"] is None
    assert waiting_id in {n["id"] for n in await listed(state="pending")}
    assert not {sent_id, waiting_id} & {n["id"] for n in await listed(kind="daily_summary")}
    bad = await app_client.get("/notifications", params={"state": "lost"}, headers=auth["read"])
    assert bad.status_code == 422 and "lost" in bad.json()["detail"]
    assert (await app_client.get("/notifications", params={"kind": "nope"}, headers=auth["read"])).status_code == 422
    assert (await app_client.get("/notifications")).status_code == 401


async def test_a_worker_killed_mid_batch_of_50_leaves_one_copy_each_but_the_one_in_flight(
    db: asyncpg.Pool, clean_redis: Redis, spawn_worker: Any, sink: MailSink
) -> None:
    recipients = [f"r{i:02d}@example.com" for i in range(50)]
    env = {
        "SALESDASH_SMTP_HOST": HOST,
        "SALESDASH_SMTP_PORT": str(sink.port),
        "SALESDASH_ALERT_RECIPIENT": ",".join(recipients),
        "SALESDASH_NOTIFY_PAUSE_MS": "60",  # a slow batch, so the kill lands in its middle
        "SALESDASH_NOTIFY_LEASE_SECONDS": "2",
    }
    settings = settings_for(
        smtp_host=HOST, smtp_port=sink.port, alert_recipient=",".join(recipients), notify_lease_s=2.0
    )
    notification_id = await record(db, settings, "test:sigkill")
    ours = {r["message_id"] for r in await deliveries(db, notification_id)}
    await client.enqueue_task(clean_redis, OPERATOR, "deliver_notifications")
    worker = spawn_worker("worker.notifications.Settings", extra_env=env)

    async def some_arrived() -> bool:
        return len([m for m in sink.messages if m.message_id in ours]) >= 15

    await wait_for(some_arrived, timeout=60, interval=0.02)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = len([m for m in sink.messages if m.message_id in ours])
    assert before < 50, "the batch finished before the kill"

    await asyncio.sleep(2.5)  # the dead worker's lease runs out
    await deliver_until_done(db, settings, notification_id)
    copies = Counter((r, m.message_id) for m in sink.messages if m.message_id in ours for r in m.recipients)
    per_recipient = Counter(r for r, _ in copies.elements())
    assert set(per_recipient) == set(recipients)
    assert all(len({mid for (r2, mid) in copies if r2 == r}) == 1 for r in recipients)  # one Message-ID each
    assert sum(1 for r in recipients if per_recipient[r] == 2) <= 1 and max(per_recipient.values()) <= 2
    states = {r["state"] for r in await deliveries(db, notification_id)}
    assert states == {"sent"}


async def test_the_same_summary_twice_at_once_with_racing_senders_sends_one_mail_each(
    db: asyncpg.Pool, sink: MailSink
) -> None:
    recipients = [f"race{i:02d}@example.com" for i in range(20)]
    settings = settings_for(smtp_host=HOST, smtp_port=sink.port, alert_recipient=",".join(recipients))
    ctx = {"db": db, "settings": settings}
    day = date(2025, 6, 15)
    runs = await asyncio.gather(
        send_daily_summary(ctx, day=day),
        send_daily_summary(ctx, day=day),  # enqueued twice, two workers at once
        deliver_due(db, settings),  # and the every-minute sender racing them
        deliver_due(db, settings),
    )
    assert len({r["notification_id"] for r in runs[:2]} - {None}) == 1  # one of them recorded it
    await deliver_due(db, settings)
    subject = f"Daily summary for {day}"
    got = Counter(r for m in sink.messages if m.message["Subject"] == subject for r in m.recipients)
    assert got == Counter(recipients)


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as a private CA's would be."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_starttls_and_login_when_configured(db: asyncpg.Pool, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append((data.login, data.password))
        return AuthResult(success=data.login == b"ops" and data.password == PASSWORD.encode())

    sink = MailSink(authenticator=authenticator, tls_context=tls, require_starttls=True).start()
    try:
        base = {"smtp_host": HOST, "smtp_port": sink.port, "smtp_username": "ops", "smtp_password": PASSWORD}
        plain = settings_for(**base)  # the server insists on STARTTLS: refused, and said so
        refused_id = await record(db, plain, "test:starttls-refused")
        refused = await deliver_due(db, plain, [refused_id])
        logged_in_without_tls = list(logins)
        secured = settings_for(**base, smtp_starttls=True, smtp_ca_file=cert)
        notification_id = await record(db, secured, "test:starttls")
        await deliver_until_done(db, secured, notification_id)
    finally:
        sink.stop()
    assert refused["email"]["retrying"] == 1 and not logged_in_without_tls
    assert "STARTTLS" in refused["email"]["errors"][0]
    assert logins == [(b"ops", PASSWORD.encode())] and len(sink.messages) == 1
    assert [r["state"] for r in await deliveries(db, notification_id)] == ["sent"]
