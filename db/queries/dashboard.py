"""Dashboard payloads, read from the analytics rollups by their stable names (migration 0002).

`mv_hourly_sales_metrics` buckets UTC hours; `mv_daily_sales_summary`, `mv_daily_product_sales` and
`mv_daily_category_sales` bucket local days in SALESDASH_TIMEZONE. Ranges are whole local days
`[start_day, end_day]`. Every measure but one adds up over days (an order lies on one day, a customer's first
order too); distinct customers over several days do not, so that figure is counted from `orders` over the
range, with the rollups' own test of which local day an order belongs to.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from db.dashboard_records import (
    CategoryBreakdown,
    CategorySales,
    CustomerSegments,
    HourlyBucket,
    HourlyMetrics,
    LowStockProduct,
    LowStockProducts,
    Period,
    ProductSales,
    RankBy,
    SalesOverview,
    SegmentCount,
    TopCategories,
    TopProducts,
)

MAX_HOURS = 168
MAX_TOP_LIMIT = 100
LOW_STOCK_LIMIT = 200
_ZERO = Decimal("0.00")

# $1, $2: first and last local day; $3: the timezone those days are local to.
_OVERVIEW = """
WITH days AS (
    SELECT coalesce(sum(revenue), 0)::numeric(16,2) AS revenue,
           coalesce(sum(orders_count), 0)::bigint AS orders,
           coalesce(sum(paid_orders), 0)::bigint AS paid_orders,
           coalesce(sum(units), 0)::bigint AS units,
           coalesce(sum(new_customers), 0)::bigint AS new_customers,
           coalesce(sum(cancelled_orders), 0)::bigint AS cancelled_orders,
           coalesce(sum(refunded_orders), 0)::bigint AS refunded_orders,
           coalesce(sum(refunded_amount), 0)::numeric(16,2) AS refunded_amount
      FROM mv_daily_sales_summary
     WHERE day BETWEEN $1 AND $2
), customers AS (
    -- 2 h of slack around local midnight, as the rollups have it, for zones whose clocks change at midnight;
    -- the date test decides
    SELECT count(DISTINCT customer_id) AS distinct_customers
      FROM orders
     WHERE created_at >= ($1::date::timestamp AT TIME ZONE $3) - interval '2 hours'
       AND created_at < (($2::date + 1)::timestamp AT TIME ZONE $3) + interval '2 hours'
       AND (created_at AT TIME ZONE $3)::date BETWEEN $1 AND $2
)
SELECT days.*, round(days.revenue / nullif(days.paid_orders, 0), 2) AS average_order_value,
       customers.distinct_customers, customers.distinct_customers - days.new_customers AS returning_customers
  FROM days, customers
"""

# $1, $2: first and last hour (UTC, naive as the view stores them).
_HOURLY = """
SELECT g.hour AT TIME ZONE 'UTC' AS hour,
       coalesce(m.orders_count, 0) AS orders,
       coalesce(m.paid_orders, 0) AS paid_orders,
       coalesce(m.revenue, 0)::numeric(16,2) AS revenue,
       coalesce(m.units, 0) AS units,
       m.avg_order_value AS average_order_value,
       coalesce(m.unique_customers, 0) AS distinct_customers,
       coalesce(m.cancelled_orders, 0) AS cancelled_orders,
       coalesce(m.refunded_orders, 0) AS refunded_orders,
       coalesce(m.refunded_amount, 0)::numeric(16,2) AS refunded_amount
  FROM generate_series($1::timestamp, $2::timestamp, interval '1 hour') AS g(hour)
  LEFT JOIN mv_hourly_sales_metrics m ON m.hour = g.hour AND m.hour BETWEEN $1 AND $2  -- a primary-key range
 ORDER BY g.hour
"""

# $3: 'revenue' or 'units'; $4: how many. An order lies on one day, so daily order counts add up exactly.
_TOP_PRODUCTS = """
SELECT p.id AS product_id, p.sku, p.name, p.category, s.units, s.revenue, s.orders
  FROM (SELECT product_id, sum(units)::bigint AS units, sum(revenue)::numeric(16,2) AS revenue,
               sum(orders_count)::bigint AS orders
          FROM mv_daily_product_sales
         WHERE day BETWEEN $1 AND $2
         GROUP BY product_id) AS s
  JOIN products p ON p.id = s.product_id
 ORDER BY CASE WHEN $3 = 'units' THEN s.units::numeric ELSE s.revenue END DESC, s.revenue DESC, p.id
 LIMIT $4
"""

_CATEGORY_SALES = """
WITH sales AS (
    SELECT category, sum(units)::bigint AS units, sum(revenue)::numeric(16,2) AS revenue,
           sum(orders_count)::bigint AS orders
      FROM mv_daily_category_sales
     WHERE day BETWEEN $1 AND $2
     GROUP BY category
)
"""

_TOP_CATEGORIES = (
    _CATEGORY_SALES
    + """
SELECT category, units, revenue, orders,
       coalesce(revenue / nullif(sum(revenue) OVER (), 0), 0)::float8 AS revenue_share
  FROM sales
 ORDER BY CASE WHEN $3 = 'units' THEN units::numeric ELSE revenue END DESC, revenue DESC, category
 LIMIT $4
"""
)

# Every category of the catalogue (and any sold one since dropped from it), zero when nothing sold.
_CATEGORY_BREAKDOWN = (
    _CATEGORY_SALES
    + """
, categories AS (SELECT category FROM products UNION SELECT category FROM sales)
SELECT c.category, coalesce(s.units, 0) AS units, coalesce(s.revenue, 0)::numeric(16,2) AS revenue,
       coalesce(s.orders, 0) AS orders,
       coalesce(s.revenue / nullif(sum(s.revenue) OVER (), 0), 0)::float8 AS revenue_share
  FROM categories c
  LEFT JOIN sales s USING (category)
 ORDER BY revenue DESC, c.category
"""
)

_SEGMENTS = """
SELECT coalesce(segment, 'unsegmented') AS segment, count(*) AS customers,
       (count(*)::float8 / sum(count(*)) OVER ()) AS share
  FROM customers
 GROUP BY 1
 ORDER BY customers DESC, segment
"""

# The products `check_low_stock_products` last found low (`low_stock_state`, db/queries/stock.py: demand-based
# reorder point, or under the fixed threshold), with their stock now. Stock is whole units, so "at or under a
# reorder point of 12.4" is "at or under 12", and "under a threshold of 10" is "at or under 9": the panel's
# reorder point is the larger of the two, and the shortfall is never negative for a product the check named.
_LOW_STOCK = """
SELECT product_id, sku, name, category, stock_quantity, reorder_point,
       greatest(reorder_point - stock_quantity, 0) AS shortfall, lead_time_days, count(*) OVER () AS total
  FROM (SELECT p.id AS product_id, p.sku, p.name, p.category, p.stock_quantity, p.lead_time_days,
               greatest(floor(s.reorder_point)::int, p.low_stock_threshold - 1) AS reorder_point
          FROM low_stock_state s JOIN products p ON p.id = s.product_id) low
 ORDER BY shortfall DESC, product_id
 LIMIT $1
"""


def _fields(row: asyncpg.Record, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in drop}


async def data_watermark(conn: asyncpg.Connection) -> datetime | None:
    """The newest order's created_at: the payloads computed in the same snapshot include nothing newer."""
    value: datetime | None = await conn.fetchval("SELECT max(created_at) FROM orders")
    return value


async def sales_overview(conn: asyncpg.Connection, period: Period) -> SalesOverview:
    row = await conn.fetchrow(_OVERVIEW, period.start_date, period.end_date, period.timezone)
    assert row is not None  # aggregates without GROUP BY always answer one row
    return SalesOverview(period=period, **_fields(row))


async def hourly_metrics(conn: asyncpg.Connection, hours: int, current_hour: datetime) -> HourlyMetrics:
    """The `hours` UTC hours up to and including `current_hour` (an aware datetime on the hour)."""
    last = current_hour.replace(tzinfo=None) - (current_hour.utcoffset() or timedelta())
    first = last - timedelta(hours=hours - 1)
    rows = await conn.fetch(_HOURLY, first, last)
    return HourlyMetrics(hours=hours, buckets=[HourlyBucket(**_fields(r)) for r in rows])


async def top_products(conn: asyncpg.Connection, period: Period, by: RankBy, limit: int) -> TopProducts:
    rows = await conn.fetch(_TOP_PRODUCTS, period.start_date, period.end_date, by.value, limit)
    return TopProducts(period=period, by=by, limit=limit, products=[ProductSales(**_fields(r)) for r in rows])


async def top_categories(conn: asyncpg.Connection, period: Period, by: RankBy, limit: int) -> TopCategories:
    rows = await conn.fetch(_TOP_CATEGORIES, period.start_date, period.end_date, by.value, limit)
    return TopCategories(period=period, by=by, limit=limit, categories=[CategorySales(**_fields(r)) for r in rows])


async def category_breakdown(conn: asyncpg.Connection, period: Period) -> CategoryBreakdown:
    rows = await conn.fetch(_CATEGORY_BREAKDOWN, period.start_date, period.end_date)
    categories = [CategorySales(**_fields(r)) for r in rows]
    return CategoryBreakdown(
        period=period,
        revenue=sum((c.revenue for c in categories), start=_ZERO),
        units=sum(c.units for c in categories),
        categories=categories,
    )


async def customer_segments(conn: asyncpg.Connection) -> CustomerSegments:
    rows = await conn.fetch(_SEGMENTS)
    segments = [SegmentCount(**_fields(r)) for r in rows]
    return CustomerSegments(customers=sum(s.customers for s in segments), segments=segments)


async def low_stock_products(conn: asyncpg.Connection, limit: int = LOW_STOCK_LIMIT) -> LowStockProducts:
    rows = await conn.fetch(_LOW_STOCK, limit)
    return LowStockProducts(
        total=rows[0]["total"] if rows else 0,
        products=[LowStockProduct(**_fields(r, drop=("total",))) for r in rows],
    )
