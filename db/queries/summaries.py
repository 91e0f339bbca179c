"""What the daily summary and the weekly report read beyond the report figures (db/queries/reports.py): the products
whose revenue moved most between two periods, and the segment changes recorded in a period."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from db.queries.reports import REVENUE_STATUSES, Period, ProductMover, SegmentMove

MOVERS = 5

# Revenue per product in each period (both ranges prune the partitions); movers are ranked by the change.
_MOVERS = """
WITH sales AS (
    SELECT i.product_id,
           sum(i.quantity * i.unit_price) FILTER (WHERE i.created_at >= $1 AND i.created_at < $2) AS now_revenue,
           sum(i.quantity * i.unit_price) FILTER (WHERE i.created_at >= $3 AND i.created_at < $4) AS then_revenue
      FROM order_items i
      JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at
     WHERE ((i.created_at >= $1 AND i.created_at < $2) OR (i.created_at >= $3 AND i.created_at < $4))
       AND ((o.created_at >= $1 AND o.created_at < $2) OR (o.created_at >= $3 AND o.created_at < $4))
       AND o.status = ANY($5::text[])
     GROUP BY i.product_id),
changes AS (
    SELECT product_id, coalesce(now_revenue, 0) AS revenue, coalesce(then_revenue, 0) AS previous_revenue,
           coalesce(now_revenue, 0) - coalesce(then_revenue, 0) AS change
      FROM sales)
SELECT c.product_id, p.sku, p.name, c.revenue, c.previous_revenue, c.change
  FROM changes c JOIN products p ON p.id = c.product_id
 WHERE c.change <> 0
 ORDER BY c.change * $6 DESC, c.product_id
 LIMIT $7"""

_MIGRATION = """
SELECT from_segment, to_segment, count(DISTINCT customer_id) AS customers
  FROM customer_segment_history
 WHERE changed_at >= $1 AND changed_at < $2 AND from_segment IS DISTINCT FROM to_segment
 GROUP BY 1, 2
 ORDER BY customers DESC, 1 NULLS FIRST, 2"""


async def product_movers(
    conn: asyncpg.Connection, period: Period, previous: Period, *, gains: bool, limit: int = MOVERS
) -> list[ProductMover]:
    """The `limit` largest revenue gains (or losses) from `previous` to `period`."""
    rows = await conn.fetch(
        _MOVERS, period.start, period.end, previous.start, previous.end, REVENUE_STATUSES, 1 if gains else -1, limit
    )
    return [ProductMover.model_validate(dict(r)) for r in rows]


async def segment_migration(conn: asyncpg.Connection, start: datetime, end: datetime) -> list[SegmentMove]:
    return [SegmentMove.model_validate(dict(r)) for r in await conn.fetch(_MIGRATION, start, end)]
