"""Report jobs: the monthly sales report, stored in `reports` as JSON and as a self-contained HTML page."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from db.queries.reports import (
    Comparison,
    MonthlyReport,
    Period,
    daily_revenue,
    lock_report_period,
    period_figures,
    save_report,
    segment_mix,
    top_categories,
    top_products,
)
from salesdash.periods import Month
from worker.progress import report_progress
from worker.report_page import render_monthly_report

MONTHLY = "monthly"


def month_period(month: Month, timezone: str) -> Period:
    start, end = month.bounds(ZoneInfo(timezone))
    return Period(month.first_day, month.last_day, start, end, timezone)


async def generate_monthly_report(ctx: dict[str, Any], *, month: str | None = None) -> dict[str, Any]:
    """The report of `month` (YYYY-MM), by default the previous calendar month in SALESDASH_TIMEZONE. A second
    run for the same month replaces the stored report; two runs at once take turns (advisory lock)."""
    timezone: str = ctx["settings"].timezone
    target = Month.parse(month) if month else Month.current(ZoneInfo(timezone)).plus(-1)
    period = month_period(target, timezone)
    async with ctx["db"].acquire() as conn:
        # Held until the connection goes back to the pool, whose reset releases it (pg_advisory_unlock_all) after
        # success, failure or cancellation alike: no await in a `finally` that could turn an abort into an error.
        await lock_report_period(conn, MONTHLY, period.first_day)
        report = await _gather(ctx, conn, target, period)
        await report_progress(ctx, 0.9, "rendering the page")
        html = render_monthly_report(report)
        saved = await save_report(conn, MONTHLY, period, report.model_dump(mode="json"), html, ctx.get("job_id"))
    return {
        "report_id": saved.id,
        "replaced": saved.replaced,
        "kind": MONTHLY,
        "month": str(target),
        "timezone": timezone,
        "complete": report.complete,
        "revenue": str(report.figures.revenue),
        "orders": report.figures.orders,
    }


async def _gather(ctx: dict[str, Any], conn: asyncpg.Connection, month: Month, period: Period) -> MonthlyReport:
    """Every figure from one snapshot, so they add up even while orders keep arriving."""
    generated_at = datetime.now(UTC)  # no later than the snapshot: `complete` never claims too much
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await report_progress(ctx, 0.0, f"figures of {month}")
        figures = await period_figures(conn, period)
        await report_progress(ctx, 0.2, "comparison months")
        earlier_month, year_ago = month.plus(-1), month.plus(-12)
        previous_month = await period_figures(conn, month_period(earlier_month, period.timezone))
        previous_year = await period_figures(conn, month_period(year_ago, period.timezone))
        await report_progress(ctx, 0.4, "daily revenue")
        daily = await daily_revenue(conn, period)
        await report_progress(ctx, 0.5, "top products and categories")
        products, categories = await top_products(conn, period), await top_categories(conn, period)
        await report_progress(ctx, 0.8, "segment mix")
        segments = await segment_mix(conn, period)
    return MonthlyReport(
        month=str(month),
        timezone=period.timezone,
        period_start=period.first_day,
        period_end=period.last_day,
        starts_at=period.start,
        ends_at=period.end,
        generated_at=generated_at,
        complete=period.end <= generated_at,
        figures=figures,
        previous_month=Comparison.between(str(earlier_month), figures, previous_month),
        previous_year=Comparison.between(str(year_ago), figures, previous_year),
        top_products=products,
        top_categories=categories,
        segments=segments,
        daily=daily,
    )
