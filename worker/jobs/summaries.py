"""`send_daily_summary` (yesterday, a local day in SALESDASH_TIMEZONE) and `weekly_performance_report` (the previous
ISO week, stored in `reports` like the monthly report): figures read from one snapshot, recorded in the outbox under
a dedupe key (`daily_summary:<day>`, `weekly_report:<week>`), so a second run sends nothing, then delivered."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from db.queries.notifications import NewNotification
from db.queries.reports import (
    HEADLINE,
    Period,
    PeriodFigures,
    WeekComparison,
    WeeklyReport,
    daily_revenue,
    lock_report_period,
    period_figures,
    save_report,
    top_categories,
    top_products,
)
from db.queries.stock import count_low_stock
from db.queries.summaries import product_movers, segment_migration
from salesdash.config import Settings
from salesdash.periods import iso_week, parse_iso_week
from worker.delivery import deliver_due
from worker.mail import Document, Table, render_html, render_text
from worker.outbox import notify
from worker.report_page import count, daily_chart, money, percent

TOP = 5
WEEKLY = "weekly"


def days_period(first: date, last: date, timezone: str) -> Period:
    """Local days [first, last] as instants: local midnights, so a DST day is 23 or 25 hours long."""
    tz = ZoneInfo(timezone)
    start, end = datetime.combine(first, time(), tz), datetime.combine(last + timedelta(days=1), time(), tz)
    return Period(first, last, start.astimezone(UTC), end.astimezone(UTC), timezone)


def _show(name: str, value: Any) -> str:
    return money(value) if isinstance(value, Decimal) or name in ("revenue", "refunded_amount") else count(value)


# --------------------------------------------------------------------------------------------------
# Daily summary
# --------------------------------------------------------------------------------------------------


def trailing_average(figures: PeriodFigures, days: int) -> dict[str, Decimal | None]:
    """Per-day averages of the headline figures; the average order value is the period's own."""
    averages: dict[str, Decimal | None] = {}
    for name in HEADLINE:
        value = getattr(figures, name)
        averages[name] = value if name == "average_order_value" else round(Decimal(value) / days, 2)
    return averages


async def _daily_figures(conn: asyncpg.Connection, day: date, timezone: str) -> dict[str, Any]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        period = days_period(day, day, timezone)
        figures = await period_figures(conn, period)
        last_week = await period_figures(conn, days_period(day - timedelta(days=7), day - timedelta(days=7), timezone))
        trailing = await period_figures(conn, days_period(day - timedelta(days=7), day - timedelta(days=1), timezone))
        return {
            "day": day.isoformat(),
            "timezone": timezone,
            "starts_at": period.start.isoformat(),
            "ends_at": period.end.isoformat(),
            "figures": figures.model_dump(mode="json"),
            "same_weekday_last_week": last_week.model_dump(mode="json"),
            "trailing_7_day_average": {
                k: None if v is None else str(v) for k, v in trailing_average(trailing, 7).items()
            },
            "top_products": [p.model_dump(mode="json") for p in await top_products(conn, period, TOP)],
            "top_categories": [c.model_dump(mode="json") for c in await top_categories(conn, period, TOP)],
            "low_stock_products": await count_low_stock(conn),
        }


def daily_document(summary: dict[str, Any]) -> Document:
    figures, last_week = summary["figures"], summary["same_weekday_last_week"]
    average = summary["trailing_7_day_average"]
    rows = [
        [name.replace("_", " ").capitalize(), str(figures[name]), str(last_week[name]), str(average[name])]
        for name in HEADLINE
    ]
    products = [[p["sku"], p["name"], p["category"], str(p["units"]), p["revenue"]] for p in summary["top_products"]]
    categories = [[c["category"], str(c["units"]), c["revenue"]] for c in summary["top_categories"]]
    return Document(
        title=f"Daily summary for {summary['day']}",
        paragraphs=[
            f"{summary['day']} in {summary['timezone']}, against the same weekday last week and the average of the "
            f"7 days before. {summary['low_stock_products']} products are low on stock."
        ],
        tables=[
            Table("Figures", ["", "Yesterday", "Same weekday last week", "7-day average"], rows),
            Table(f"Top {TOP} products", ["SKU", "Product", "Category", "Units", "Revenue"], products),
            Table(f"Top {TOP} categories", ["Category", "Units", "Revenue"], categories),
        ],
    )


async def send_daily_summary(ctx: dict[str, Any], *, day: date | None = None) -> dict[str, Any]:
    settings: Settings = ctx["settings"]
    day = day or datetime.now(settings.tzinfo).date() - timedelta(days=1)
    async with ctx["db"].acquire() as conn:
        summary = await _daily_figures(conn, day, settings.timezone)
        document = daily_document(summary)
        note = NewNotification(
            "daily_summary", "info", document.title, render_text(document), render_html(document), summary,
            f"daily_summary:{day}",
        )  # fmt: skip
        notification_id = await notify(conn, settings, note)
    delivery = await deliver_due(ctx["db"], settings, [notification_id]) if notification_id else None
    return {"day": day.isoformat(), "notification_id": notification_id, "delivery": delivery,
            "revenue": summary["figures"]["revenue"], "orders": summary["figures"]["orders"]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Weekly report
# --------------------------------------------------------------------------------------------------


def year_earlier(monday: date) -> date:
    """The Monday of the same ISO week number a year earlier (week 53 falls back to 52)."""
    year, week, _ = monday.isocalendar()
    try:
        return date.fromisocalendar(year - 1, week, 1)
    except ValueError:
        return date.fromisocalendar(year - 1, 52, 1)


async def _weekly(conn: asyncpg.Connection, monday: date, timezone: str) -> WeeklyReport:
    period = days_period(monday, monday + timedelta(days=6), timezone)
    earlier, last_year = monday - timedelta(days=7), year_earlier(monday)
    previous = days_period(earlier, earlier + timedelta(days=6), timezone)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        generated_at = datetime.now(UTC)
        figures = await period_figures(conn, period)
        before = await period_figures(conn, previous)
        year_ago = await period_figures(conn, days_period(last_year, last_year + timedelta(days=6), timezone))
        return WeeklyReport(
            week=iso_week(monday), timezone=timezone, period_start=period.first_day, period_end=period.last_day,
            starts_at=period.start, ends_at=period.end, generated_at=generated_at, figures=figures,
            previous_week=WeekComparison.between(iso_week(earlier), figures, before),
            previous_year=WeekComparison.between(iso_week(last_year), figures, year_ago),
            daily=await daily_revenue(conn, period),
            top_movers=await product_movers(conn, period, previous, gains=True),
            bottom_movers=await product_movers(conn, period, previous, gains=False),
            segment_migration=await segment_migration(conn, period.start, period.end),
        )  # fmt: skip


def weekly_document(report: WeeklyReport) -> Document:
    wow, yoy = report.previous_week, report.previous_year
    rows = [
        [name.replace("_", " ").capitalize(), _show(name, getattr(report.figures, name)),
         percent(wow.change_pct[name]), percent(yoy.change_pct[name])]
        for name in HEADLINE
    ]  # fmt: skip

    def movers(items: list[Any]) -> list[list[str]]:
        return [[m.sku, m.name, money(m.revenue), money(m.previous_revenue), money(m.change)] for m in items]

    mover_headers = ["SKU", "Product", "Revenue", "Previous week", "Change"]
    migration = [[m.from_segment or "(none)", m.to_segment, count(m.customers)] for m in report.segment_migration]
    return Document(
        title=f"Weekly performance report {report.week}",
        paragraphs=[f"{report.period_start} to {report.period_end} in {report.timezone}, against {wow.week} and "
                    f"{yoy.week}. New customers: {count(report.figures.new_customers)}; returning: "
                    f"{count(report.figures.returning_customers)}."],
        tables=[
            Table("Figures", ["", report.week, "Week over week", "Year over year"], rows),
            Table("Top movers", mover_headers, movers(report.top_movers)),
            Table("Bottom movers", mover_headers, movers(report.bottom_movers)),
            Table("Segment migration", ["From", "To", "Customers"], migration),
        ],
        chart=daily_chart(report.daily),
        chart_title="Daily revenue",
    )  # fmt: skip


async def weekly_performance_report(ctx: dict[str, Any], *, week: str | None = None) -> dict[str, Any]:
    """The report of ISO week `week` (default: the previous one), stored (a re-run replaces it) and sent once."""
    settings: Settings = ctx["settings"]
    today = datetime.now(settings.tzinfo).date()
    monday = parse_iso_week(week) if week else today - timedelta(days=today.weekday() + 7)
    async with ctx["db"].acquire() as conn:
        await lock_report_period(conn, WEEKLY, monday)  # released with the connection, as for the monthly report
        report = await _weekly(conn, monday, settings.timezone)
        document = weekly_document(report)
        html = render_html(document)
        period = days_period(report.period_start, report.period_end, settings.timezone)
        async with conn.transaction():  # the stored report and its notification together
            saved = await save_report(conn, WEEKLY, period, report.model_dump(mode="json"), html, ctx.get("job_id"))
            note = NewNotification(
                "weekly_report", "info", document.title, render_text(document), html,
                {"report_id": saved.id, "week": report.week}, f"weekly_report:{report.week}",
            )  # fmt: skip
            notification_id = await notify(conn, settings, note)
    delivery = await deliver_due(ctx["db"], settings, [notification_id]) if notification_id else None
    return {"report_id": saved.id, "replaced": saved.replaced, "week": report.week,
            "notification_id": notification_id, "delivery": delivery}  # fmt: skip
