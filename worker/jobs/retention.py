"""Retention of the tables that grow, one daily task (`job_runs` stays prune_job_history's)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from db.queries.retention import BATCH_ROWS, RULES, RetentionRule, delete_batch
from salesdash.config import Settings
from worker.progress import report_progress


def retention_days(settings: Settings) -> dict[str, int]:
    return {
        "reports": settings.report_retention_days,
        "notifications": settings.notification_retention_days,
        "customer_segment_history": settings.segment_history_retention_days,
    }


def _cutoff(rule: RetentionRule, now: datetime, days: int) -> date | datetime:
    return now.date() - timedelta(days=days) if rule.by_date else now - timedelta(days=days)


async def _prune(conn: asyncpg.Connection, rule: RetentionRule, cutoff: date | datetime) -> tuple[int, int]:
    """Batches until one finds fewer than BATCH_ROWS old rows; returns (rows deleted, batches)."""
    deleted, batches = 0, 0
    while True:
        went = await delete_batch(conn, rule, cutoff, BATCH_ROWS)
        deleted, batches = deleted + went, batches + 1
        if went < BATCH_ROWS:
            return deleted, batches


async def prune_old_records(ctx: dict[str, Any]) -> dict[str, Any]:
    settings = ctx["settings"]
    now, days = datetime.now(settings.tzinfo), retention_days(settings)  # local now: reports' dates are local
    tables = []
    async with ctx["db"].acquire() as conn:
        for index, rule in enumerate(RULES):
            await report_progress(ctx, index / len(RULES), f"deleting old rows of {rule.table}")
            cutoff = _cutoff(rule, now, days[rule.table])
            deleted, batches = await _prune(conn, rule, cutoff)
            tables.append(
                {
                    "table": rule.table,
                    "deleted": deleted,
                    "batches": batches,
                    "retention_days": days[rule.table],
                    "older_than": cutoff.isoformat(),
                }
            )
    return {"tables": tables}
