"""Where notifications go: the channels configured in settings, parsed once, each problem named without stopping the
other channels. Secrets stay in `SecretStr` and are read only where a message is signed or a login is made; a webhook
is shown by its name (host and a hash of the URL), never by its URL, which often carries a token."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiosmtplib

from db.queries.notifications import Recipient
from salesdash.config import Settings

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Webhook:
    name: str  # host-<8 hex of the URL's hash>: what deliveries, logs and the API show
    url: str


@dataclass(frozen=True)
class Channels:
    email_to: list[str]  # empty: no SMTP server configured
    webhooks: list[Webhook]
    problems: list[str] = field(default_factory=list)  # malformed values, named; the rest still works

    def recipients(self) -> list[Recipient]:
        return [Recipient("email", a) for a in self.email_to] + [Recipient("webhook", w.name) for w in self.webhooks]

    def webhook(self, name: str) -> Webhook | None:
        return next((w for w in self.webhooks if w.name == name), None)


def webhook_name(url: str) -> str:
    host = urlsplit(url).hostname or "invalid"
    return f"{host}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _webhooks(raw: str) -> tuple[list[Webhook], list[str]]:
    hooks, problems = [], []
    for index, url in enumerate((u.strip() for u in raw.split(",")), start=1):
        if not url:
            continue
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if valid:
            hooks.append(Webhook(webhook_name(url), url))
        else:
            problems.append(f"SALESDASH_WEBHOOK_URLS entry {index} is not an http(s) URL with a host: it is skipped")
    return hooks, problems


def configured_channels(settings: Settings) -> Channels:
    hooks, problems = _webhooks(settings.webhook_urls.get_secret_value())
    if hooks and settings.webhook_secret is None:
        problems.append("SALESDASH_WEBHOOK_SECRET is not set: webhooks are sent unsigned")
    email_to = settings.alert_recipients if settings.smtp_host else []
    if settings.smtp_host and not email_to:
        problems.append("SALESDASH_ALERT_RECIPIENT names no address: no e-mail is sent")
    return Channels(email_to, hooks, problems)


def smtp_client(settings: Settings) -> aiosmtplib.SMTP:
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
    return aiosmtplib.SMTP(
        hostname=settings.smtp_host,
        port=settings.smtp_port,
        timeout=settings.smtp_timeout_s,
        start_tls=settings.smtp_starttls,
        cert_bundle=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
        username=settings.smtp_username,
        password=password,
    )


async def probe_smtp(settings: Settings) -> str | None:
    """None when the SMTP server answers and accepts the login; else what went wrong (no secret in it)."""
    if not settings.smtp_host:
        return None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            smtp = smtp_client(settings)
            await smtp.connect()
            await smtp.quit()
    except (OSError, TimeoutError, aiosmtplib.SMTPException) as exc:
        return f"SMTP {settings.smtp_host}:{settings.smtp_port}: {type(exc).__name__}: {exc}"
    return None


async def probe_webhook(hook: Webhook) -> str | None:
    """None when the webhook's host accepts a TCP connection; else why not."""
    parts = urlsplit(hook.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parts.hostname, port)
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        return f"webhook {hook.name}: {type(exc).__name__}: {exc}"
    return None


async def channel_problems(settings: Settings) -> dict[str, str | None]:
    """Each configured channel and what is wrong with it (None: it answers), plus `config` for malformed values."""
    channels = configured_channels(settings)
    names = (["email"] if settings.smtp_host else []) + [f"webhook_{hook.name}" for hook in channels.webhooks]
    probes = ([probe_smtp(settings)] if settings.smtp_host else []) + [probe_webhook(h) for h in channels.webhooks]
    found: dict[str, str | None] = dict(zip(names, await asyncio.gather(*probes), strict=True))  # at once: ≤ 5 s
    found["config"] = "; ".join(channels.problems) or None
    return found
