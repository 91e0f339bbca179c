"""Recording a notification for every configured recipient (worker/channels.py), in the caller's transaction."""

from __future__ import annotations

import asyncpg

from db.queries.notifications import NewNotification, record_notification
from salesdash.config import Settings
from worker.channels import configured_channels


async def notify(conn: asyncpg.Connection, settings: Settings, note: NewNotification) -> int | None:
    """The new notification's id, or None when its dedupe key was recorded before (nothing more is sent)."""
    return await record_notification(conn, note, configured_channels(settings).recipients())
