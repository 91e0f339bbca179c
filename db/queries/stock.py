"""Demand-based low stock: per active product, the average daily demand over the last DEMAND_DAYS local days and its
standard deviation (days without sales count as zero), safety stock z·σ·√L, reorder point d̄·L + safety stock, days
of cover. A product is low at or under its reorder point, or under its fixed `low_stock_threshold` when one is set.

`low_stock_state` holds the products alerted as low: a crossing is a low product not in it yet (alerted once), and a
product in it that is no longer low leaves it (re-armed: the next fall alerts again). One statement evaluates, records
the crossings and re-arms, so the state always matches one evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

DEMAND_DAYS = 28
# Demand is what customers ordered: every order but cancelled and refunded ones.
DEMAND_STATUSES = ["pending", "paid", "shipped", "delivered"]

# σ is the sample standard deviation over the DEMAND_DAYS daily totals, zeros included:
# sqrt((Σx² − (Σx)²/n) / (n − 1)).
_EVALUATE = """
WITH daily AS (
    SELECT i.product_id, (i.created_at AT TIME ZONE $3)::date AS day, sum(i.quantity)::numeric AS units
      FROM order_items i
      JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at
     WHERE i.created_at >= $1 AND i.created_at < $2 AND o.created_at >= $1 AND o.created_at < $2
       AND o.status = ANY($6::text[])
     GROUP BY 1, 2),
totals AS (SELECT product_id, sum(units) AS units, sum(units * units) AS squares FROM daily GROUP BY 1),
demand AS (
    SELECT p.id AS product_id, p.sku, p.name, p.stock_quantity, p.lead_time_days, p.low_stock_threshold,
           coalesce(t.units, 0) / $4::numeric AS mean,
           sqrt(greatest(coalesce(t.squares, 0) - coalesce(t.units, 0) ^ 2 / $4::numeric, 0) / ($4::numeric - 1)) AS sd
      FROM products p LEFT JOIN totals t ON t.product_id = p.id
     WHERE p.active),
evaluation AS (
    SELECT d.*, $5::numeric * d.sd * sqrt(d.lead_time_days::numeric) AS safety_stock,
           d.mean * d.lead_time_days + $5::numeric * d.sd * sqrt(d.lead_time_days::numeric) AS reorder_point,
           d.stock_quantity / nullif(d.mean, 0) AS days_of_cover
      FROM demand d),
low AS (
    SELECT * FROM evaluation
     WHERE stock_quantity <= reorder_point OR stock_quantity < low_stock_threshold),
rearmed AS (
    DELETE FROM low_stock_state s WHERE NOT EXISTS (SELECT 1 FROM low l WHERE l.product_id = s.product_id)
    RETURNING s.product_id),
crossed AS (
    INSERT INTO low_stock_state (product_id, stock_quantity, reorder_point)
    SELECT product_id, stock_quantity, round(reorder_point, 2) FROM low
        ON CONFLICT (product_id) DO NOTHING
    RETURNING product_id)
SELECT l.product_id, l.sku, l.name, l.stock_quantity, l.lead_time_days, l.low_stock_threshold,
       round(l.mean, 3) AS mean_daily_demand, round(l.sd, 3) AS demand_sd, round(l.safety_stock, 2) AS safety_stock,
       round(l.reorder_point, 2) AS reorder_point, round(l.days_of_cover, 1) AS days_of_cover,
       c.product_id IS NOT NULL AS crossed
  FROM low l LEFT JOIN crossed c ON c.product_id = l.product_id
 ORDER BY l.days_of_cover NULLS FIRST, l.sku"""


@dataclass(frozen=True)
class LowProduct:
    product_id: int
    sku: str
    name: str
    stock_quantity: int
    lead_time_days: int
    low_stock_threshold: int | None
    mean_daily_demand: Decimal
    demand_sd: Decimal
    safety_stock: Decimal
    reorder_point: Decimal
    days_of_cover: Decimal | None  # None: no demand in the window
    crossed: bool  # newly low: this run alerts it


async def lock_low_stock(conn: asyncpg.Connection) -> None:
    """Two runs take turns (transaction lock): the second sees the first one's crossings as already alerted."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('salesdash:low_stock'))")


async def evaluate_low_stock(
    conn: asyncpg.Connection, start: datetime, end: datetime, timezone: str, z: float
) -> list[LowProduct]:
    """Every low product (crossed: newly), recording the crossings and re-arming the products no longer low.
    [start, end) are the DEMAND_DAYS local days before the run's day."""
    rows = await conn.fetch(_EVALUATE, start, end, timezone, DEMAND_DAYS, z, DEMAND_STATUSES)
    return [LowProduct(**dict(r)) for r in rows]


async def link_alert(conn: asyncpg.Connection, notification_id: int, product_ids: Sequence[int]) -> None:
    await conn.execute(
        "UPDATE low_stock_state SET notification_id = $1 WHERE product_id = ANY($2::bigint[])",
        notification_id,
        list(product_ids),
    )


async def count_low_stock(conn: asyncpg.Connection) -> int:
    """Products alerted as low and not restocked since (the daily summary's figure)."""
    return int(await conn.fetchval("SELECT count(*) FROM low_stock_state"))
