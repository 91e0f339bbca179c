"""The stock domain: `check_low_stock_products` records one alert per low product per day, run by a real
notifications worker, and running it again the same day adds none."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import arq_burst
from worker import client


async def test_low_stock_products_get_one_alert_a_day(db: asyncpg.Pool, clean_redis: Redis) -> None:
    await db.execute("""INSERT INTO products (sku, name, category, price, cost, stock_quantity, reorder_point)
                        VALUES ('STOCK-LOW', 'Nearly gone', 'test', 10, 5, 2, 5),
                               ('STOCK-EDGE', 'At the point', 'test', 10, 5, 5, 5),
                               ('STOCK-OK', 'Plenty', 'test', 10, 5, 50, 5)
                        ON CONFLICT (sku) DO UPDATE SET stock_quantity = EXCLUDED.stock_quantity,
                                                        reorder_point = EXCLUDED.reorder_point""")
    low = await db.fetchval("SELECT count(*) FROM products WHERE stock_quantity <= reorder_point")
    # other tests of the session may have run the check today already: start from no alerts
    await db.execute("DELETE FROM notifications WHERE kind = 'low_stock'")
    results = []
    for _ in range(2):
        job = await client.enqueue_task(clean_redis, OPERATOR, "check_low_stock_products")
        assert arq_burst("notifications").returncode == 0
        status = await client.job_status(clean_redis, db, job.task_id)
        assert status.status == "complete", status
        results.append(status.result)
    assert results[0]["low_stock_products"] == low and results[0]["alerts_created"] == low
    assert results[1] == {"low_stock_products": low, "alerts_created": 0}
    alerted = {
        r["payload"]["sku"]
        for r in await db.fetch(
            "SELECT payload FROM notifications WHERE kind = 'low_stock' AND created_at > now() - interval '1 hour'"
        )
    }
    assert {"STOCK-LOW", "STOCK-EDGE"} <= alerted and "STOCK-OK" not in alerted
