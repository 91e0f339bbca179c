"""`deliver_notifications` (every minute): send the outbox's due deliveries (new ones, retries after backoff, and those
a dead worker had claimed), both channels at once (worker/delivery.py)."""

from __future__ import annotations

from typing import Any

from worker.delivery import deliver_due


async def deliver_notifications(ctx: dict[str, Any]) -> dict[str, Any]:
    return await deliver_due(ctx["db"], ctx["settings"])
