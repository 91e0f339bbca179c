"""The stock domain: `check_low_stock_products` on a crafted demand history puts exactly the expected products under
their reorder point (d̄·L + z·σ·√L, or under a fixed threshold), alerts them in one digest mail, stays quiet while they
stay low, and alerts a product again after a restock lifted it above and it fell again."""

from __future__ import annotations

import math
import statistics
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, time, timedelta
from statistics import NormalDist
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst
from tests.notify_servers import HOST, MailSink, running_sink
from worker import client, dashboard
from worker.dashboard import Moment
from worker.jobs.stock import check_low_stock_products

LEAD = {"LS-STEADY-LOW": 7, "LS-STEADY-OK": 7, "LS-SPIKY": 4, "LS-THRESH-LOW": 7, "LS-THRESH-EDGE": 7}
# units sold per day, oldest first, over the 29 days up to and including the check's day
STEADY = [10] * 29
SPIKY = [0, 20] * 14 + [0]


@pytest.fixture
def sink() -> Iterator[MailSink]:
    yield from running_sink()


@pytest.fixture
async def catalogue(db: asyncpg.Pool) -> AsyncIterator[dict[str, int]]:
    """Only this test's products are active while it runs; each has its demand history in `orders`."""
    await db.execute("DELETE FROM low_stock_state")
    await db.execute("UPDATE products SET active = false WHERE sku NOT LIKE 'LS-%'")
    ids = {}
    for sku, stock, threshold in [
        ("LS-STEADY-LOW", 69, None),  # d̄ 10, σ 0, L 7: reorder point 70
        ("LS-STEADY-OK", 71, None),
        ("LS-SPIKY", 73, None),  # d̄ 10, σ > 0, L 4: 40 + z·σ·2 ≈ 73.5, above d̄·L alone
        ("LS-THRESH-LOW", 5, 10),  # no demand: reorder point 0, but under its threshold
        ("LS-THRESH-EDGE", 10, 10),  # at its threshold is not under it
    ]:
        ids[sku] = await db.fetchval(
            """INSERT INTO products (sku, name, category, price, cost, stock_quantity, lead_time_days,
                                     low_stock_threshold)
               VALUES ($1, $1 || ' <b>&</b>', 'stock-test', 10, 5, $2, $3, $4)
               ON CONFLICT (sku) DO UPDATE SET stock_quantity = $2, lead_time_days = $3, low_stock_threshold = $4,
                                               active = true
               RETURNING id""",
            sku,
            stock,
            LEAD[sku],
            threshold,
        )
    await db.execute(  # inactive, with no stock: never evaluated
        "INSERT INTO products (sku, name, category, price, cost, stock_quantity, active) "
        "VALUES ('LS-RETIRED', 'Retired', 'stock-test', 1, 1, 0, false) ON CONFLICT (sku) DO NOTHING"
    )
    yield ids
    await db.execute("UPDATE products SET active = true WHERE sku NOT LIKE 'LS-RETIRED'")


async def sell(db: asyncpg.Pool, product_id: int, units: list[int], last_day: date) -> None:
    """One order a day at local noon (the test timezone is UTC), `units[-1]` on `last_day`."""
    customer = await db.fetchval(
        "INSERT INTO customers (email, name, country) VALUES ('stock-test@example.com', 'Stock', 'US') "
        "ON CONFLICT (email) DO UPDATE SET name = 'Stock' RETURNING id"
    )
    first = last_day - timedelta(days=len(units) - 1)
    for offset, quantity in enumerate(units):
        if quantity == 0:
            continue
        at = datetime.combine(first + timedelta(days=offset), time(12), get_settings().tzinfo)
        order_id = await db.fetchval(
            "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, 'paid', $2, $3) "
            "RETURNING id",
            customer,
            quantity * 10,
            at,
        )
        await db.execute(
            "INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at) "
            "VALUES ($1, 1, $2, $3, 10, $4)",
            order_id,
            product_id,
            quantity,
            at,
        )


def expected_reorder_point(window: list[int], lead: int) -> float:
    z = NormalDist().inv_cdf(0.95)
    return statistics.mean(window) * lead + z * statistics.stdev(window) * math.sqrt(lead)


def job_ctx(db: Any, sink: MailSink) -> dict[str, Any]:
    settings = get_settings().model_copy(update={"smtp_host": HOST, "smtp_port": sink.port})
    return {"db": db, "settings": settings}


async def test_crafted_demand_alerts_each_crossing_once_in_one_digest(
    db: asyncpg.Pool, clean_redis: Redis, catalogue: dict[str, int], sink: MailSink
) -> None:
    today = datetime.now(get_settings().tzinfo).date()
    for sku in ("LS-STEADY-LOW", "LS-STEADY-OK"):
        await sell(db, catalogue[sku], STEADY, today)
    await sell(db, catalogue["LS-SPIKY"], SPIKY, today)
    window = SPIKY[:-1]  # the 28 days before today; today's sales count from tomorrow
    assert 73 <= expected_reorder_point(window, 4) < 74
    assert statistics.mean(window) * 4 < 73  # without σ the spiky product would not be low

    # the scheduled path: a real notifications worker, delivering to the SMTP server
    env = {"SALESDASH_SMTP_HOST": HOST, "SALESDASH_SMTP_PORT": str(sink.port)}
    job = await client.enqueue_task(clean_redis, OPERATOR, "check_low_stock_products")
    assert arq_burst("notifications", extra_env=env).returncode == 0
    first = (await client.job_status(clean_redis, db, job.task_id)).result
    assert first is not None and sorted(first["newly_low"]) == ["LS-SPIKY", "LS-STEADY-LOW", "LS-THRESH-LOW"]
    assert first["low_stock_products"] == 3 and first["delivery"]["email"]["sent"] == 1
    (mail,) = sink.messages  # one digest, not one mail per product
    html = mail.html
    assert "LS-SPIKY &lt;b&gt;&amp;&lt;/b&gt;" in html and "<b>&</b>" not in html  # product names escaped
    text = mail.text
    assert all(sku in text for sku in first["newly_low"]) and "LS-STEADY-OK" not in text

    ctx = job_ctx(db, sink)
    tomorrow = today + timedelta(days=1)
    second = await check_low_stock_products(ctx, as_of=tomorrow)  # a second day, no restock
    assert second["newly_low"] == [] and second["notification_id"] is None and second["low_stock_products"] == 3

    await db.execute("UPDATE products SET stock_quantity = 500 WHERE id = $1", catalogue["LS-STEADY-LOW"])
    restocked = await check_low_stock_products(ctx, as_of=tomorrow)
    assert restocked["newly_low"] == [] and restocked["low_stock_products"] == 2
    assert not await db.fetchval("SELECT EXISTS (SELECT 1 FROM low_stock_state WHERE product_id = $1)",
                                 catalogue["LS-STEADY-LOW"])  # fmt: skip

    await db.execute("UPDATE products SET stock_quantity = 30 WHERE id = $1", catalogue["LS-STEADY-LOW"])
    fell = await check_low_stock_products(ctx, as_of=tomorrow)
    assert fell["newly_low"] == ["LS-STEADY-LOW"] and fell["notification_id"] is not None
    assert len(sink.messages) == 2 and "LS-STEADY-LOW" in sink.messages[1].message["Subject"] + sink.messages[1].text
    state = await db.fetchrow(
        "SELECT stock_quantity, reorder_point FROM low_stock_state WHERE product_id = $1", catalogue["LS-SPIKY"]
    )
    assert state["stock_quantity"] == 73 and float(state["reorder_point"]) == pytest.approx(
        expected_reorder_point(window, 4), abs=0.01
    )


async def test_the_dashboards_low_stock_panel_names_the_products_the_check_names(
    db: asyncpg.Pool, catalogue: dict[str, int], sink: MailSink
) -> None:
    today = datetime.now(get_settings().tzinfo).date()
    await sell(db, catalogue["LS-STEADY-LOW"], STEADY, today)
    # the seed's fixed reorder points say the opposite of demand: the panel must not follow them
    await db.execute("UPDATE products SET reorder_point = 0 WHERE id = $1", catalogue["LS-STEADY-LOW"])
    await db.execute("UPDATE products SET reorder_point = 1000 WHERE id = $1", catalogue["LS-THRESH-EDGE"])
    checked = await check_low_stock_products(job_ctx(db, sink), as_of=today + timedelta(days=1))

    async with db.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        req = dashboard.request(dashboard.LOW_STOCK_PRODUCTS, {}, Moment.current(ZoneInfo("UTC")))
        panel = (await dashboard.compute_in(conn, req, datetime.now(UTC))).data
    named = {p.sku for p in panel.products}
    assert named == set(checked["newly_low"])  # the state was empty: every low product is newly low
    assert panel.total == checked["low_stock_products"] == len(named)
    assert {"LS-STEADY-LOW", "LS-THRESH-LOW"} <= named and "LS-THRESH-EDGE" not in named
    state = await db.fetchval(
        "SELECT reorder_point FROM low_stock_state WHERE product_id = $1", catalogue["LS-STEADY-LOW"]
    )
    steady = next(p for p in panel.products if p.sku == "LS-STEADY-LOW")
    assert steady.reorder_point == math.floor(state) >= 70 and steady.shortfall == steady.reorder_point - 69
