"""Reports: the sales figures of a period, read straight from `orders` / `order_items`, and the `reports` table.

Every figure query filters `created_at >= start AND created_at < end` on the partitioned tables (and on both
sides of the orders/items join), so PostgreSQL scans only the month partitions the period touches. A period
is a pair of instants: a local month in the store's timezone usually spans two UTC partitions.

Revenue counts `paid`, `shipped` and `delivered` orders, as the analytics views do; refunds are `refunded`
orders, counted in the month the order was placed (the schema records no refund date).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, Field

REVENUE_STATUSES = ["paid", "shipped", "delivered"]
TOP_N = 10


@dataclass(frozen=True)
class Period:
    """Local days [first_day, last_day] and the instants [start, end) they cover in `timezone`."""

    first_day: date
    last_day: date
    start: datetime
    end: datetime
    timezone: str


class PeriodFigures(BaseModel):
    revenue: Decimal
    orders: int  # orders that count as revenue
    average_order_value: Decimal | None  # revenue / orders; null without orders
    units: int  # items of those orders
    orders_placed: int  # every order placed, whatever its status
    cancelled_orders: int
    refunds: int
    refunded_amount: Decimal
    customers: int  # customers with an order that counts
    new_customers: int  # ... whose first such order ever is in the period
    returning_customers: int  # ... who had one before


class DayRevenue(BaseModel):
    day: date
    revenue: Decimal
    orders: int


class ProductSales(BaseModel):
    product_id: int
    sku: str
    name: str
    category: str
    units: int
    revenue: Decimal
    orders: int


class CategorySales(BaseModel):
    category: str
    units: int
    revenue: Decimal
    orders: int


class SegmentMix(BaseModel):
    segment: str | None  # null: the customer has not been segmented yet
    customers: int
    orders: int
    revenue: Decimal


HEADLINE = (
    "revenue",
    "orders",
    "average_order_value",
    "units",
    "customers",
    "new_customers",
    "returning_customers",
    "refunds",
    "refunded_amount",
)


class Comparison(BaseModel):
    """The same figures for an earlier month, and the change to this month in percent (null when the
    earlier value is zero or missing)."""

    month: str
    figures: PeriodFigures
    change_pct: dict[str, Decimal | None]

    @classmethod
    def between(cls, month: str, current: PeriodFigures, earlier: PeriodFigures) -> Comparison:
        return cls(
            month=month,
            figures=earlier,
            change_pct={name: percent_change(getattr(current, name), getattr(earlier, name)) for name in HEADLINE},
        )


def percent_change(current: Decimal | int | None, earlier: Decimal | int | None) -> Decimal | None:
    if current is None or not earlier:
        return None
    return round((Decimal(current) - Decimal(earlier)) * 100 / Decimal(earlier), 1)


class MonthlyReport(BaseModel):
    """The payload of a `monthly` report (`reports.payload`)."""

    kind: Literal["monthly"] = "monthly"
    month: str  # YYYY-MM, a calendar month in `timezone`
    timezone: str
    period_start: date
    period_end: date  # last day, inclusive
    starts_at: datetime  # the instants [starts_at, ends_at) the month covers
    ends_at: datetime
    generated_at: datetime
    complete: bool  # false: generated before the month ended, so later orders are missing
    figures: PeriodFigures
    previous_month: Comparison
    previous_year: Comparison
    top_products: list[ProductSales]
    top_categories: list[CategorySales]
    segments: list[SegmentMix]
    daily: list[DayRevenue]


class WeekComparison(BaseModel):
    """The same figures for an earlier ISO week, and the change to this week in percent (null as in Comparison)."""

    week: str  # YYYY-Www
    figures: PeriodFigures
    change_pct: dict[str, Decimal | None]

    @classmethod
    def between(cls, week: str, current: PeriodFigures, earlier: PeriodFigures) -> WeekComparison:
        change = {name: percent_change(getattr(current, name), getattr(earlier, name)) for name in HEADLINE}
        return cls(week=week, figures=earlier, change_pct=change)


class ProductMover(BaseModel):
    product_id: int
    sku: str
    name: str
    revenue: Decimal
    previous_revenue: Decimal
    change: Decimal  # revenue - previous_revenue


class SegmentMove(BaseModel):
    from_segment: str | None  # null: the customer had no segment before
    to_segment: str
    customers: int


class WeeklyReport(BaseModel):
    """The payload of a `weekly` report (weekly_performance_report, worker/jobs/summaries.py)."""

    kind: Literal["weekly"] = "weekly"
    week: str  # YYYY-Www, an ISO week of local days in `timezone`
    timezone: str
    period_start: date  # Monday
    period_end: date  # Sunday
    starts_at: datetime
    ends_at: datetime
    generated_at: datetime
    figures: PeriodFigures
    previous_week: WeekComparison
    previous_year: WeekComparison  # the same ISO week number a year earlier
    daily: list[DayRevenue]
    top_movers: list[ProductMover]  # the largest revenue gains over the previous week
    bottom_movers: list[ProductMover]  # the largest losses
    segment_migration: list[SegmentMove]  # changes update_customer_segments recorded during the week


# Three independent aggregates in one statement (one snapshot, one round trip). A buyer is returning when an
# earlier order of theirs counts too; the EXISTS probes orders_customer_idx (customer_id, created_at).
_FIGURES = """
WITH buyers AS (
    SELECT DISTINCT customer_id FROM orders
     WHERE created_at >= $1 AND created_at < $2 AND status = ANY($3::text[])
)
SELECT o.revenue, o.orders, round(o.revenue / nullif(o.orders, 0), 2) AS average_order_value, u.units,
       o.orders_placed, o.cancelled_orders, o.refunds, o.refunded_amount,
       b.customers, b.customers - b.returning_customers AS new_customers, b.returning_customers
  FROM (SELECT count(*) AS orders_placed,
               count(*) FILTER (WHERE status = ANY($3::text[])) AS orders,
               coalesce(sum(total_amount) FILTER (WHERE status = ANY($3::text[])), 0) AS revenue,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled_orders,
               count(*) FILTER (WHERE status = 'refunded') AS refunds,
               coalesce(sum(total_amount) FILTER (WHERE status = 'refunded'), 0) AS refunded_amount
          FROM orders
         WHERE created_at >= $1 AND created_at < $2) o,
       (SELECT coalesce(sum(i.quantity), 0)::bigint AS units
          FROM order_items i
          JOIN orders r ON r.id = i.order_id AND r.created_at = i.created_at
         WHERE i.created_at >= $1 AND i.created_at < $2 AND r.created_at >= $1 AND r.created_at < $2
           AND r.status = ANY($3::text[])) u,
       (SELECT (SELECT count(*) FROM buyers) AS customers,
               (SELECT count(*) FROM buyers
                 WHERE EXISTS (SELECT 1 FROM orders p
                                WHERE p.customer_id = buyers.customer_id AND p.created_at < $1
                                  AND p.status = ANY($3::text[]))) AS returning_customers) b
"""

# Local days come from the store's timezone; generate_series fills days without orders with zeros.
_DAILY = """
WITH daily AS (
    SELECT (created_at AT TIME ZONE $3)::date AS day, sum(total_amount) AS revenue, count(*) AS orders
      FROM orders
     WHERE created_at >= $1 AND created_at < $2 AND status = ANY($4::text[])
     GROUP BY 1
)
SELECT g.day::date AS day, coalesce(d.revenue, 0) AS revenue, coalesce(d.orders, 0) AS orders
  FROM generate_series($5::date, $6::date, interval '1 day') AS g(day)
  LEFT JOIN daily d ON d.day = g.day::date
 ORDER BY 1
"""

# Items of the period's orders that count; the same range on both sides prunes both partitioned tables.
_COUNTED_ITEMS = """
      FROM order_items i
      JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at
     WHERE i.created_at >= $1 AND i.created_at < $2 AND o.created_at >= $1 AND o.created_at < $2
       AND o.status = ANY($3::text[])
"""

# Rank on product ids first, then look up the ten winners' names.
_TOP_PRODUCTS = f"""
WITH sales AS (
    SELECT i.product_id, sum(i.quantity)::bigint AS units, sum(i.quantity * i.unit_price) AS revenue,
           count(DISTINCT i.order_id) AS orders
    {_COUNTED_ITEMS}
     GROUP BY i.product_id
     ORDER BY revenue DESC, i.product_id
     LIMIT $4
)
SELECT s.product_id, p.sku, p.name, p.category, s.units, s.revenue, s.orders
  FROM sales s JOIN products p ON p.id = s.product_id
 ORDER BY s.revenue DESC, s.product_id
"""

_TOP_CATEGORIES = f"""
WITH sales AS (
    SELECT i.product_id, i.order_id, i.quantity, i.quantity * i.unit_price AS amount
    {_COUNTED_ITEMS}
)
SELECT p.category, sum(s.quantity)::bigint AS units, sum(s.amount) AS revenue, count(DISTINCT s.order_id) AS orders
  FROM sales s JOIN products p ON p.id = s.product_id
 GROUP BY p.category
 ORDER BY revenue DESC, p.category
 LIMIT $4
"""

# The segment a customer has now (customers.segment, kept by the segmentation job), over the period's buyers.
_SEGMENT_MIX = """
SELECT c.segment, count(DISTINCT o.customer_id) AS customers, count(*) AS orders, sum(o.total_amount) AS revenue
  FROM orders o
  JOIN customers c ON c.id = o.customer_id
 WHERE o.created_at >= $1 AND o.created_at < $2 AND o.status = ANY($3::text[])
 GROUP BY c.segment
 ORDER BY customers DESC, c.segment NULLS LAST
"""


async def period_figures(conn: asyncpg.Connection, period: Period) -> PeriodFigures:
    row = await conn.fetchrow(_FIGURES, period.start, period.end, REVENUE_STATUSES)
    return PeriodFigures.model_validate(dict(row))


async def daily_revenue(conn: asyncpg.Connection, period: Period) -> list[DayRevenue]:
    rows = await conn.fetch(
        _DAILY, period.start, period.end, period.timezone, REVENUE_STATUSES, period.first_day, period.last_day
    )
    return [DayRevenue.model_validate(dict(r)) for r in rows]


async def top_products(conn: asyncpg.Connection, period: Period, limit: int = TOP_N) -> list[ProductSales]:
    rows = await conn.fetch(_TOP_PRODUCTS, period.start, period.end, REVENUE_STATUSES, limit)
    return [ProductSales.model_validate(dict(r)) for r in rows]


async def top_categories(conn: asyncpg.Connection, period: Period, limit: int = TOP_N) -> list[CategorySales]:
    rows = await conn.fetch(_TOP_CATEGORIES, period.start, period.end, REVENUE_STATUSES, limit)
    return [CategorySales.model_validate(dict(r)) for r in rows]


async def segment_mix(conn: asyncpg.Connection, period: Period) -> list[SegmentMix]:
    rows = await conn.fetch(_SEGMENT_MIX, period.start, period.end, REVENUE_STATUSES)
    return [SegmentMix.model_validate(dict(r)) for r in rows]


# ------------------------------------------------------------------------------------------------------------
# The reports table
# ------------------------------------------------------------------------------------------------------------


class ReportSummary(BaseModel):
    id: int
    kind: str
    period_start: date
    period_end: date  # the period's last day, inclusive
    job_id: str | None
    created_at: datetime  # when this version was generated (a re-run replaces the row and moves it)


class StoredReport(ReportSummary):
    payload: Annotated[MonthlyReport | WeeklyReport, Field(discriminator="kind")]
    html: str | None


@dataclass(frozen=True)
class SavedReport:
    id: int
    replaced: bool  # an earlier report of the same kind and period was overwritten


# One row per (kind, period): a second run overwrites the first in place, keeping its id.
_UPSERT = """
INSERT INTO reports (kind, period_start, period_end, payload, html, job_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (kind, period_start, period_end) DO UPDATE
   SET payload = EXCLUDED.payload, html = EXCLUDED.html, job_id = EXCLUDED.job_id, created_at = now()
RETURNING id, xmax <> 0 AS replaced
"""


async def save_report(
    conn: asyncpg.Connection,
    kind: str,
    period: Period,
    payload: dict[str, Any],
    html: str,
    job_id: str | None,
) -> SavedReport:
    row = await conn.fetchrow(_UPSERT, kind, period.first_day, period.last_day, payload, html, job_id)
    return SavedReport(id=row["id"], replaced=row["replaced"])


async def lock_report_period(conn: asyncpg.Connection, kind: str, first_day: date) -> None:
    """Wait until no other run writes this report. A session lock, taken before the read snapshot (so the
    figures are at least as fresh as the report they replace); it lasts until `conn` is released to its pool,
    whose reset unlocks it, or closed."""
    await conn.execute("SELECT pg_advisory_lock(hashtext('salesdash:report'), hashtext($1))", f"{kind}:{first_day}")


async def list_reports(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    kind: str | None,
    overlapping_from: date | None,
    overlapping_to: date | None,
    limit: int,
) -> list[ReportSummary]:
    """Reports whose period overlaps [from, to], newest period first."""
    rows = await conn.fetch(
        """SELECT id, kind, period_start, period_end, job_id, created_at FROM reports
            WHERE ($1::text IS NULL OR kind = $1)
              AND ($2::date IS NULL OR period_end >= $2) AND ($3::date IS NULL OR period_start <= $3)
            ORDER BY period_start DESC, period_end DESC, id DESC
            LIMIT $4""",
        kind,
        overlapping_from,
        overlapping_to,
        limit,
    )
    return [ReportSummary.model_validate(dict(r)) for r in rows]


async def get_report(conn: asyncpg.Connection | asyncpg.Pool, report_id: int) -> StoredReport | None:
    row = await conn.fetchrow(
        "SELECT id, kind, period_start, period_end, job_id, created_at, payload, html FROM reports WHERE id = $1",
        report_id,
    )
    return StoredReport.model_validate(dict(row)) if row else None
