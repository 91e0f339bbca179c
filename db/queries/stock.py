"""Low-stock alerts."""

from __future__ import annotations

import asyncpg

# One alert per product per day, whoever runs it and however often (dedupe_key is unique).
_RECORD_LOW_STOCK = """
INSERT INTO notifications (kind, channel, recipient, subject, body, payload, dedupe_key)
SELECT 'low_stock', 'email', $1,
       format('Low stock: %s (%s)', p.name, p.sku),
       format('%s has %s units left; reorder point %s, lead time %s days.',
              p.name, p.stock_quantity, p.reorder_point, p.lead_time_days),
       jsonb_build_object('product_id', p.id, 'sku', p.sku, 'stock_quantity', p.stock_quantity,
                          'reorder_point', p.reorder_point),
       format('low_stock:%s:%s', p.id, $2::date)
  FROM products p
 WHERE p.stock_quantity <= p.reorder_point
ON CONFLICT (dedupe_key) DO NOTHING
"""


async def record_low_stock_alerts(conn: asyncpg.Connection, recipient: str, day: object) -> int:
    status = await conn.execute(_RECORD_LOW_STOCK, recipient, day)
    return int(status.split()[-1])


async def count_low_stock(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM products WHERE stock_quantity <= reorder_point"))
