"""The dashboard domain: every number equals a direct aggregate over orders/order_items computed here, the
cache computes a payload once however many requests miss together, entries expire and are recomputed, and a
real worker's warm_dashboard_cache fills every key."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from db.dashboard_records import DashboardRange, Period, RankBy
from salesdash.auth import OPERATOR
from tests.conftest import arq_burst, wait_for
from tests.test_api import gql
from worker import cache, client, dashboard
from worker.dashboard import Moment
from worker.jobs.views import refresh_all_materialized_views

UTC_ZONE = ZoneInfo("UTC")
PAID = "('paid','shipped','delivered')"
SEGMENTS = ("champions", "loyal", "at_risk")


@pytest.fixture(scope="module")
async def seeded(db: asyncpg.Pool) -> None:
    """A small deterministic shop up to now (so today has orders), a few segments, the rollups refreshed."""
    from db.seed import seed

    async with db.acquire() as conn:
        await seed(conn, customers=300, products=40, orders=4_000, months=2, seed=11, progress=False)
        # every fourth customer stays unsegmented
        await conn.execute("UPDATE customers SET segment = ($1::text[])[id % 4] WHERE id % 4 > 0", list(SEGMENTS))
    await refresh_all_materialized_views({"db": db})


def instants(period: Period) -> tuple[datetime, datetime]:
    """The period's local days as instants [start, end), with Python's zoneinfo (not PostgreSQL's)."""
    tz = ZoneInfo(period.timezone)
    start = datetime.combine(period.start_date, time(), tz)
    return start, datetime.combine(period.end_date + timedelta(days=1), time(), tz)


async def compute(db: asyncpg.Pool, query: dashboard.DashboardQuery[Any], args: dict[str, Any], moment: Moment) -> Any:
    [entry] = await dashboard.compute_all(db, [dashboard.request(query, args, moment)])
    return entry.data


async def expected_overview(db: asyncpg.Pool, period: Period) -> dict[str, Any]:
    start, end = instants(period)
    row = await db.fetchrow(
        f"""SELECT coalesce(sum(total_amount) FILTER (WHERE status IN {PAID}), 0) AS revenue,
                   count(*) AS orders, count(*) FILTER (WHERE status IN {PAID}) AS paid_orders,
                   count(DISTINCT customer_id) AS distinct_customers,
                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled_orders,
                   count(*) FILTER (WHERE status = 'refunded') AS refunded_orders,
                   coalesce(sum(total_amount) FILTER (WHERE status = 'refunded'), 0) AS refunded_amount
              FROM orders WHERE created_at >= $1 AND created_at < $2""",
        start,
        end,
    )
    units = await db.fetchval(
        f"""SELECT coalesce(sum(i.quantity), 0) FROM orders o
              JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
             WHERE o.status IN {PAID} AND o.created_at >= $1 AND o.created_at < $2""",
        start,
        end,
    )
    expected = dict(row)
    paid = expected["paid_orders"]
    expected["average_order_value"] = (expected["revenue"] / paid).quantize(Decimal("0.01")) if paid else None
    expected["units"] = units
    return expected


def _sales_sql(key: str, columns: str, extra_join: str = "") -> str:
    return f"""SELECT {columns}, sum(i.quantity) AS units, sum(i.quantity * i.unit_price) AS revenue,
                      count(DISTINCT i.order_id) AS orders
                 FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
                 JOIN products p ON p.id = i.product_id {extra_join}
                WHERE o.status IN {PAID} AND o.created_at >= $1 AND o.created_at < $2
                GROUP BY {key}"""


async def expected_top_products(db: asyncpg.Pool, period: Period, by: RankBy, limit: int) -> list[tuple[Any, ...]]:
    start, end = instants(period)
    rows = await db.fetch(
        _sales_sql("p.id", "p.id AS product_id, min(p.sku) AS sku")
        + f" ORDER BY {by.value} DESC, revenue DESC, product_id LIMIT $3",
        start,
        end,
        limit,
    )
    return [(r["product_id"], r["sku"], r["units"], r["revenue"], r["orders"]) for r in rows]


async def expected_categories(db: asyncpg.Pool, period: Period) -> dict[str, tuple[Any, ...]]:
    start, end = instants(period)
    rows = await db.fetch(_sales_sql("p.category", "p.category"), start, end)
    return {r["category"]: (r["units"], r["revenue"], r["orders"]) for r in rows}


@pytest.mark.parametrize("range_", list(DashboardRange))
async def test_sales_overview_equals_orders(seeded: None, db: asyncpg.Pool, range_: DashboardRange) -> None:
    moment = Moment(datetime.now(UTC), UTC_ZONE)
    overview = await compute(db, dashboard.SALES_OVERVIEW, {"range": range_}, moment)
    assert overview.period == moment.period(range_)
    expected = await expected_overview(db, overview.period)
    assert expected["orders"] > 0, "the seed should give every range some orders"
    assert overview.model_dump(exclude={"period"}) == expected


def test_ranges_are_whole_local_days() -> None:
    today = date(2026, 3, 15)
    assert DashboardRange.TODAY.local_days(today) == (today, today)
    assert DashboardRange.YESTERDAY.local_days(today) == (date(2026, 3, 14), date(2026, 3, 14))
    assert DashboardRange.LAST_7_DAYS.local_days(today) == (date(2026, 3, 9), today)
    assert DashboardRange.LAST_30_DAYS.local_days(today) == (date(2026, 2, 14), today)
    assert DashboardRange.MONTH_TO_DATE.local_days(today) == (date(2026, 3, 1), today)
    # 11:30 UTC on 15 March is already 16 March in Auckland (UTC+13 in March)
    moment = Moment(datetime(2026, 3, 15, 11, 30, tzinfo=UTC), ZoneInfo("Pacific/Auckland"))
    assert moment.today == date(2026, 3, 16)
    assert moment.current_hour == datetime(2026, 3, 15, 11, tzinfo=UTC)


async def test_hourly_metrics_equal_orders(seeded: None, db: asyncpg.Pool) -> None:
    moment = Moment(datetime.now(UTC), UTC_ZONE)
    metrics = await compute(db, dashboard.HOURLY_METRICS, {"hours": 48}, moment)
    expected = await db.fetch(
        f"""SELECT g.hour, count(o.*) AS orders, count(o.*) FILTER (WHERE o.status IN {PAID}) AS paid_orders,
                   coalesce(sum(o.total_amount) FILTER (WHERE o.status IN {PAID}), 0) AS revenue,
                   count(DISTINCT o.customer_id) AS distinct_customers,
                   count(o.*) FILTER (WHERE o.status = 'cancelled') AS cancelled_orders
              FROM generate_series($1::timestamptz - interval '47 hours', $1::timestamptz, interval '1 hour') g(hour)
              LEFT JOIN orders o ON o.created_at >= g.hour AND o.created_at < g.hour + interval '1 hour'
             GROUP BY g.hour ORDER BY g.hour""",
        moment.current_hour,
    )
    assert len(metrics.buckets) == 48
    assert metrics.buckets[-1].hour == moment.current_hour
    assert [b.model_dump() for b in metrics.buckets] == [dict(r) for r in expected]
    assert sum(b.orders for b in metrics.buckets) > 0


@pytest.mark.parametrize("by", list(RankBy))
async def test_top_products_equal_order_items(seeded: None, db: asyncpg.Pool, by: RankBy) -> None:
    moment = Moment(datetime.now(UTC), UTC_ZONE)
    for range_ in (DashboardRange.LAST_30_DAYS, DashboardRange.TODAY):
        top = await compute(db, dashboard.TOP_PRODUCTS, {"range": range_, "by": by, "limit": 7}, moment)
        got = [(p.product_id, p.sku, p.units, p.revenue, p.orders) for p in top.products]
        assert got == await expected_top_products(db, top.period, by, 7)
        assert got and len(got) <= 7


@pytest.mark.parametrize("by", list(RankBy))
async def test_top_categories_and_breakdown_equal_order_items(seeded: None, db: asyncpg.Pool, by: RankBy) -> None:
    moment = Moment(datetime.now(UTC), UTC_ZONE)
    top = await compute(db, dashboard.TOP_CATEGORIES, {"range": "last_7_days", "by": by, "limit": 3}, moment)
    expected = await expected_categories(db, top.period)
    index = 0 if by is RankBy.UNITS else 1
    ranked = sorted(expected, key=lambda c: (-expected[c][index], -expected[c][1], c))[:3]
    assert [c.category for c in top.categories] == ranked
    total = sum(v[1] for v in expected.values())
    for c in top.categories:
        assert (c.units, c.revenue, c.orders) == expected[c.category]
        assert c.revenue_share == pytest.approx(float(c.revenue / total))

    breakdown = await compute(db, dashboard.CATEGORY_BREAKDOWN, {"range": "last_7_days"}, moment)
    catalogue = {r["category"] for r in await db.fetch("SELECT DISTINCT category FROM products")}
    assert {c.category for c in breakdown.categories} == catalogue
    for c in breakdown.categories:
        assert (c.units, c.revenue, c.orders) == expected.get(c.category, (0, Decimal("0.00"), 0))
    assert breakdown.revenue == total
    assert breakdown.units == sum(v[0] for v in expected.values())
    assert sum(c.revenue_share for c in breakdown.categories) == pytest.approx(1.0)


async def test_customer_segments_count_every_customer(seeded: None, db: asyncpg.Pool) -> None:
    segments = await compute(db, dashboard.CUSTOMER_SEGMENTS, {}, Moment.current(UTC_ZONE))
    rows = await db.fetch("SELECT segment, count(*) AS n FROM customers GROUP BY segment")
    expected = {r["segment"] or "unsegmented": r["n"] for r in rows}
    assert {s.segment: s.customers for s in segments.segments} == expected
    assert set(expected) == {*SEGMENTS, "unsegmented"}
    assert segments.customers == await db.fetchval("SELECT count(*) FROM customers")
    assert [s.customers for s in segments.segments] == sorted(expected.values(), reverse=True)


async def test_low_stock_products_are_at_or_under_their_reorder_point(seeded: None, db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        changes = conn.transaction()  # rolled back: other tests see the seeded stock
        await changes.start()
        try:
            # one product exactly at its reorder point, one far under: both count, the far one first
            at, under = await conn.fetch("SELECT id FROM products ORDER BY id LIMIT 2")
            await conn.execute("UPDATE products SET stock_quantity = reorder_point WHERE id = $1", at["id"])
            await conn.execute("UPDATE products SET reorder_point = 500, stock_quantity = 0 WHERE id = $1", under["id"])
            req = dashboard.request(dashboard.LOW_STOCK_PRODUCTS, {}, Moment.current(UTC_ZONE))
            data = (await dashboard.compute_in(conn, req, datetime.now(UTC))).data
            expected = await conn.fetch(
                "SELECT id, reorder_point - stock_quantity AS shortfall FROM products "
                "WHERE stock_quantity <= reorder_point"
            )
        finally:
            await changes.rollback()
    assert data.total == len(expected) >= 2
    assert {(p.product_id, p.shortfall) for p in data.products} == {(r["id"], r["shortfall"]) for r in expected}
    assert data.products[0].product_id == under["id"] and data.products[0].shortfall == 500
    assert [p.shortfall for p in data.products] == sorted((p.shortfall for p in data.products), reverse=True)
