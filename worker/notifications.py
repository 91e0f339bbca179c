"""The `notifications` queue: `arq worker.notifications.Settings` starts a worker for it alone."""

import logging
from typing import Any

from worker import context
from worker.channels import channel_problems
from worker.engine import install_engine
from worker.jobs import alerts, notifications, stock, summaries
from worker.registry import Queue
from worker.settings import queue_settings

log = logging.getLogger(__name__)


async def _startup(ctx: dict[str, Any]) -> None:
    """The shared start, then each misconfigured or unreachable channel named (the others still work)."""
    await context.startup(ctx)
    for channel, problem in (await channel_problems(ctx["settings"])).items():
        if problem is not None:
            log.warning("notification channel %s: %s", channel, problem)


install_engine()  # arq's CLI builds its workers with our engine from here on
Settings = queue_settings(
    Queue.NOTIFICATIONS,
    stock.check_low_stock_products,
    summaries.send_daily_summary,
    summaries.weekly_performance_report,
    alerts.check_alerts,
    notifications.deliver_notifications,
)
Settings.on_startup = _startup
