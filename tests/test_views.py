"""The views domain end to end: trigger over GraphQL, a real `arq worker.analytics.Settings --burst` runs it, the status
says complete, and the views equal a direct aggregate over the seeded orders."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import arq_burst
from tests.test_api import TRIGGER, gql
from worker import client

VIEW_VS_BASE = {
    "mv_hourly_sales_metrics": (
        """SELECT hour, orders_count, paid_orders, revenue, unique_customers, cancelled_orders
             FROM mv_hourly_sales_metrics""",
        """SELECT date_trunc('hour', created_at AT TIME ZONE 'UTC'), count(*),
                  count(*) FILTER (WHERE status IN ('paid','shipped','delivered')),
                  coalesce(sum(total_amount) FILTER (WHERE status IN ('paid','shipped','delivered')), 0),
                  count(DISTINCT customer_id), count(*) FILTER (WHERE status = 'cancelled')
             FROM orders GROUP BY 1""",
    ),
    "mv_daily_sales_summary": (
        "SELECT day, orders_count, revenue, refunded_amount FROM mv_daily_sales_summary",
        """SELECT (created_at AT TIME ZONE 'UTC')::date, count(*),
                  coalesce(sum(total_amount) FILTER (WHERE status IN ('paid','shipped','delivered')), 0),
                  coalesce(sum(total_amount) FILTER (WHERE status = 'refunded'), 0)
             FROM orders GROUP BY 1""",
    ),
    "mv_daily_category_sales": (
        "SELECT day, category, units, revenue FROM mv_daily_category_sales",
        """SELECT (o.created_at AT TIME ZONE 'UTC')::date, p.category, sum(i.quantity), sum(i.quantity * i.unit_price)
             FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
             JOIN products p ON p.id = i.product_id
            WHERE o.status IN ('paid','shipped','delivered') GROUP BY 1, 2""",
    ),
    "mv_daily_product_sales": (
        "SELECT day, product_id, units, revenue FROM mv_daily_product_sales",
        """SELECT (o.created_at AT TIME ZONE 'UTC')::date, i.product_id, sum(i.quantity), sum(i.quantity * i.unit_price)
             FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
            WHERE o.status IN ('paid','shipped','delivered') GROUP BY 1, 2""",
    ),
}


@pytest.fixture(scope="module")
async def seeded(db: asyncpg.Pool) -> None:
    from db.seed import seed

    async with db.acquire() as conn:
        await seed(conn, customers=300, products=40, orders=3_000, months=3, seed=7, progress=False)


async def test_trigger_run_and_views_match_orders(
    seeded: None, db: asyncpg.Pool, clean_redis: Redis, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    body = await gql(app_client, TRIGGER, auth["trigger"], name="refresh_all_materialized_views", priority=5)
    task_id = body["data"]["triggerBackgroundTask"]["taskId"]
    assert task_id

    run = arq_burst("analytics")
    assert run.returncode == 0, run.stdout + run.stderr

    status = await app_client.get(f"/jobs/{task_id}", headers=auth["read"])
    assert status.status_code == 200
    assert status.json()["status"] == "complete", status.json()
    assert status.json()["tries"] == 1
    refreshed = {v["view"] for v in status.json()["result"]["views"] if v["refreshed"]}
    assert refreshed == set(VIEW_VS_BASE)

    for view, (view_sql, base_sql) in VIEW_VS_BASE.items():
        view_rows = sorted(tuple(r) for r in await db.fetch(view_sql))
        base_rows = sorted(tuple(r) for r in await db.fetch(base_sql))
        assert view_rows, view
        assert view_rows == base_rows, view

    gql_status = await gql(
        app_client, f'query {{ taskStatus(taskId: "{task_id}") {{ status tries queue }} }}', auth["read"]
    )
    assert gql_status["data"]["taskStatus"] == {"status": "complete", "tries": 1, "queue": "analytics"}


async def test_refresh_keeps_up_with_new_orders(seeded: None, db: asyncpg.Pool, clean_redis: Redis) -> None:
    """A second refresh (CONCURRENTLY, now the views are populated) picks up an order added since."""
    before = await db.fetchval("SELECT coalesce(sum(revenue), 0) FROM mv_daily_sales_summary")
    await db.execute("""INSERT INTO orders (customer_id, status, total_amount, created_at)
                        VALUES ((SELECT min(id) FROM customers), 'paid', 123.45, now() - interval '1 hour')""")
    job = await client.enqueue_task(clean_redis, OPERATOR, "refresh_daily_materialized_views")
    assert arq_burst("analytics").returncode == 0
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete"
    assert all(v["concurrently"] for v in status.result["views"])
    after = await db.fetchval("SELECT sum(revenue) FROM mv_daily_sales_summary")
    assert after - before == Decimal("123.45")
