"""`db.seed.seed`: counts, money, partitions, determinism, realism of the shapes, atomicity, validation."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

import db.seed.binary as binary_module
import db.seed.load as seed_module
from db.migrate import upgrade
from db.seed import SeedSummary, seed

# --- database: one scratch database for this module (the lead may swap this for a shared fixture) ---


@pytest.fixture(scope="module")
async def db_url() -> AsyncIterator[str]:
    server = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432"
    base = server.rsplit("/", 1)[0] if server.count("/") > 2 else server
    name = f"salesdash_seed_test_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{base}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# ---------------------------------------------------------------------------------------------------

NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)  # a Saturday; the window holds a whole December
ARGS: dict[str, Any] = {"customers": 500, "products": 50, "orders": 5_000, "months": 12, "seed": 7, "now": NOW}

FINGERPRINT = """
SELECT (SELECT md5(string_agg(c::text, '|' ORDER BY c.id)) FROM customers c)
    || (SELECT md5(string_agg(p::text, '|' ORDER BY p.id)) FROM products p)
    || (SELECT md5(string_agg(o::text, '|' ORDER BY o.id)) FROM orders o)
    || (SELECT md5(string_agg(i::text, '|' ORDER BY i.order_id, i.line_no)) FROM order_items i)
"""
INDEXES = """
SELECT array_agg(indexname || ': ' || indexdef ORDER BY indexname)
  FROM pg_indexes
 WHERE schemaname = 'public'
   AND (tablename IN ('customers', 'products', 'orders', 'order_items')
        OR tablename LIKE 'orders\\_p%' OR tablename LIKE 'order\\_items\\_p%')
"""


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="module")
async def seeded(db_url: str) -> SeedSummary:
    connection = await asyncpg.connect(db_url)
    try:
        return await seed(connection, progress=False, **ARGS)
    finally:
        await connection.close()


async def test_counts_match(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    counts = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM customers) c, (SELECT count(*) FROM products) p,"
        " (SELECT count(*) FROM orders) o, (SELECT count(*) FROM order_items) i"
    )
    assert (counts["c"], counts["p"], counts["o"]) == (500, 50, 5_000)
    assert counts["i"] == seeded.order_items
    assert 5_000 <= seeded.order_items <= 5 * 5_000
    assert seeded.seconds > 0 and seeded.window_end == NOW


async def test_totals_are_exact_item_sums(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    mismatched = await conn.fetchval(
        """SELECT count(*) FROM orders o
             LEFT JOIN (SELECT order_id, created_at, sum(quantity * unit_price) AS total, count(*) AS lines
                          FROM order_items GROUP BY 1, 2) i ON i.order_id = o.id AND i.created_at = o.created_at
            WHERE i.total IS DISTINCT FROM o.total_amount OR i.lines NOT BETWEEN 1 AND 5"""
    )
    assert mismatched == 0
    # every item belongs to an order with the same created_at; line numbers are 1..n
    orphans = await conn.fetchval(
        "SELECT count(*) FROM order_items i"
        " WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id AND o.created_at = i.created_at)"
    )
    gaps = await conn.fetchval(
        "SELECT count(*) FROM (SELECT order_id, max(line_no) m, count(*) n FROM order_items GROUP BY 1) x WHERE m <> n"
    )
    assert orphans == 0 and gaps == 0
    revenue = await conn.fetchval(
        "SELECT sum(total_amount) FROM orders WHERE status IN ('paid', 'shipped', 'delivered')"
    )
    assert revenue == seeded.revenue
    assert await conn.fetchval("SELECT min(unit_price) FROM order_items") > 0


async def test_orders_in_window_and_in_their_month_partition(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    bounds = await conn.fetchrow(
        "SELECT min(created_at) lo, max(created_at) hi, max(updated_at) hu,"
        " bool_and(updated_at >= created_at) ordered FROM orders"
    )
    assert bounds["lo"] >= await conn.fetchval("SELECT $1::timestamptz - interval '12 months'", NOW)
    assert bounds["hi"] <= NOW and bounds["hu"] <= NOW and bounds["ordered"]
    misplaced = await conn.fetchval(
        """SELECT count(*) FROM orders
            WHERE tableoid::regclass::text <> 'orders_p' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY_MM')"""
    )
    assert misplaced == 0
    months = await conn.fetchval(
        "SELECT count(DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')) FROM orders"
    )
    assert months == 13  # 15 Mar 2024 .. 15 Mar 2025


async def test_sequences_continue_after_the_loaded_ids(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    for table, count in (("customers", 500), ("products", 50), ("orders", 5_000)):
        last = await conn.fetchval("SELECT pg_sequence_last_value(pg_get_serial_sequence($1, 'id')::regclass)", table)
        assert last == count, table


async def test_customers_exist_before_their_first_order(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    early = await conn.fetchval(
        "SELECT count(*) FROM customers c"
        " JOIN (SELECT customer_id, min(created_at) first FROM orders GROUP BY 1) o ON o.customer_id = c.id"
        " WHERE c.created_at >= o.first"
    )
    assert early == 0
    dangling = await conn.fetchval(
        "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)"
    )
    dangling += await conn.fetchval(
        "SELECT count(*) FROM order_items i WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = i.product_id)"
    )
    assert dangling == 0
    countries = await conn.fetchval("SELECT count(DISTINCT country) FROM customers")
    assert countries >= 10


async def test_status_mix(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT status, count(*) n FROM orders GROUP BY 1")
    share = {r["status"]: r["n"] / 5_000 for r in rows}
    assert set(share) == {"pending", "paid", "shipped", "delivered", "cancelled", "refunded"}
    assert 0.03 <= share["cancelled"] <= 0.07
    assert 0.015 <= share["refunded"] <= 0.045
    assert share["delivered"] > 0.8
    # open statuses belong to recent orders
    stale = await conn.fetchval(
        "SELECT count(*) FROM orders"
        " WHERE status IN ('pending', 'paid') AND created_at < $1::timestamptz - interval '7 days'",
        NOW,
    )
    assert stale == 0


async def test_products_categories_margins_and_low_stock(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "SELECT count(DISTINCT category) cats, bool_and(cost < price) margins, bool_and(lead_time_days > 0) leads,"
        " count(*) FILTER (WHERE stock_quantity <= reorder_point) low FROM products"
    )
    assert 8 <= row["cats"] <= 12
    assert row["margins"] and row["leads"]
    assert 1 <= row["low"] <= 3  # ~3% of 50
    assert row["low"] == seeded.low_stock_products


async def test_repeat_purchase_distribution(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "SELECT count(*) buyers, count(*) FILTER (WHERE n = 1) once, count(*) FILTER (WHERE n >= 5) loyal,"
        " max(n) top FROM (SELECT customer_id, count(*) n FROM orders GROUP BY 1) x"
    )
    assert row["once"] >= 0.15 * row["buyers"]  # many one-time buyers
    assert row["loyal"] >= 0.1 * row["buyers"]  # and a group of frequent ones
    assert row["top"] >= 50  # heavy tail
    # recency varies: some buyers were last seen in the final month, some more than half a year earlier
    recency = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE last > $1::timestamptz - interval '30 days') recent,"
        " count(*) FILTER (WHERE last < $1::timestamptz - interval '180 days') lapsed"
        " FROM (SELECT max(created_at) last FROM orders GROUP BY customer_id) x",
        NOW,
    )
    assert recency["recent"] >= 30 and recency["lapsed"] >= 30


async def test_rfm_segments_are_meaningful(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    segments = await conn.fetch(
        """SELECT CASE WHEN r = 5 AND f >= 4 THEN 'champions' WHEN r IN (3, 4) AND f >= 4 THEN 'loyal'
                       WHEN r >= 4 AND f IN (2, 3) THEN 'potential' WHEN r = 5 AND f = 1 THEN 'new'
                       WHEN r = 4 AND f = 1 THEN 'promising' WHEN r = 3 AND f = 3 THEN 'need_attention'
                       WHEN r = 3 THEN 'about_to_sleep' WHEN f = 5 THEN 'cant_lose' WHEN f IN (3, 4) THEN 'at_risk'
                       ELSE 'hibernating' END AS segment, count(*) n
             FROM (SELECT ntile(5) OVER (ORDER BY last, customer_id) r, ntile(5) OVER (ORDER BY n, customer_id) f
                     FROM (SELECT customer_id, max(created_at) last, count(*) n FROM orders
                            WHERE status IN ('paid', 'shipped', 'delivered') GROUP BY 1) b) s
            GROUP BY 1"""
    )
    assert len(segments) >= 8


async def test_hour_and_weekday_patterns(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    by_hour = dict(
        await conn.fetch(
            "SELECT extract(hour FROM created_at AT TIME ZONE 'UTC')::int, count(*) FROM orders GROUP BY 1"
        )
    )
    evening = sum(by_hour.get(h, 0) for h in (18, 19, 20, 21)) / 4
    night = sum(by_hour.get(h, 0) for h in (3, 4, 5)) / 3
    assert evening > 4 * night
    by_weekday = dict(
        await conn.fetch(
            "SELECT extract(isodow FROM created_at AT TIME ZONE 'UTC')::int, count(*) FROM orders GROUP BY 1"
        )
    )
    assert by_weekday[6] < by_weekday[1]  # Saturday quieter than Monday


async def test_seasonality(seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    by_month = dict(
        await conn.fetch(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM orders"
            " WHERE created_at >= '2024-04-01' AND created_at < '2025-03-01' GROUP BY 1"
        )
    )
    assert len(by_month) == 11
    average = sum(by_month.values()) / len(by_month)
    assert by_month["2024-12"] > 1.3 * average
    assert by_month["2024-11"] > average


async def test_same_seed_same_data_and_index_rebuild_changes_nothing(
    seeded: SeedSummary, conn: asyncpg.Connection
) -> None:
    before = await conn.fetchval(FINGERPRINT)
    indexes = await conn.fetchval(INDEXES)
    again = await seed(conn, progress=False, rebuild_indexes=True, **ARGS)
    assert await conn.fetchval(FINGERPRINT) == before
    assert await conn.fetchval(INDEXES) == indexes  # dropped and rebuilt under the same names
    assert (again.orders, again.order_items, again.revenue) == (seeded.orders, seeded.order_items, seeded.revenue)
    # inside the caller's transaction (a savepoint, no COPY FREEZE) the data is the same too
    async with conn.transaction():
        await seed(conn, progress=False, **ARGS)
    assert await conn.fetchval(FINGERPRINT) == before
    # a different seed gives different data
    await seed(conn, progress=False, **{**ARGS, "seed": 8})
    assert await conn.fetchval(FINGERPRINT) != before
    await seed(conn, progress=False, **ARGS)
    assert await conn.fetchval(FINGERPRINT) == before


@pytest.mark.parametrize(
    ("override", "argument"),
    [
        ({"customers": -1}, "customers"),
        ({"products": -5}, "products"),
        ({"orders": -1}, "orders"),
        ({"months": 0}, "months"),
        ({"customers": 0}, "customers"),
        ({"products": 0}, "products"),
        ({"seed": -3}, "seed"),
        ({"orders": 1.5}, "orders"),
        ({"now": datetime(2025, 3, 15)}, "now"),
    ],
)
async def test_bad_arguments_raise_and_leave_data_alone(
    seeded: SeedSummary, conn: asyncpg.Connection, override: dict[str, Any], argument: str
) -> None:
    before = await conn.fetchval("SELECT count(*) FROM orders")
    with pytest.raises(ValueError, match=argument):
        await seed(conn, progress=False, **{**ARGS, **override})
    assert await conn.fetchval("SELECT count(*) FROM orders") == before == 5_000


async def test_failure_mid_load_keeps_previous_data_and_indexes(
    seeded: SeedSummary, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await conn.fetchval(FINGERPRINT)
    indexes = await conn.fetchval(INDEXES)
    real_copy = binary_module._copy  # what db.seed.load calls as `_copy`

    async def failing_copy(connection: asyncpg.Connection, table: str, *args: Any) -> None:
        if table.startswith("order_items"):
            raise RuntimeError("disk full")
        await real_copy(connection, table, *args)

    monkeypatch.setattr(seed_module, "_copy", failing_copy)
    with pytest.raises(RuntimeError, match="disk full"):
        await seed(conn, progress=False, rebuild_indexes=True, **{**ARGS, "seed": 99})
    assert await conn.fetchval(FINGERPRINT) == before
    assert await conn.fetchval(INDEXES) == indexes


async def test_no_orders_and_progress_bar(db_url: str, seeded: SeedSummary, conn: asyncpg.Connection) -> None:
    try:
        summary = await seed(conn, customers=3, products=2, orders=0, months=1, seed=1, progress=True, now=NOW)
        assert (summary.customers, summary.products, summary.orders, summary.order_items) == (3, 2, 0, 0)
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0
        assert await conn.fetchval("SELECT count(*) FROM customers") == 3
        tiny = await seed(conn, customers=1, products=1, orders=200, months=1, seed=1, progress=False, now=NOW)
        assert tiny.orders == 200
        assert await conn.fetchval("SELECT count(DISTINCT customer_id) FROM orders") == 1
    finally:
        await seed(conn, progress=False, **ARGS)


# --- parallel load: orders and order_items staged on two connections, swapped in by one transaction ---

STAGING_TABLES = "SELECT count(*) FROM pg_class WHERE relname LIKE 'order%\\_stage\\_%'"


async def test_parallel_load_gives_the_same_tables(seeded: SeedSummary, conn: asyncpg.Connection, db_url: str) -> None:
    before = await conn.fetchval(FINGERPRINT)
    indexes = await conn.fetchval(INDEXES)
    summary = await seed(conn, progress=True, parallel=True, dsn=db_url, **ARGS)
    assert "swap" in summary.timings  # the staged path ran
    assert (summary.orders, summary.order_items, summary.revenue, summary.low_stock_products) == (
        seeded.orders, seeded.order_items, seeded.revenue, seeded.low_stock_products,
    )  # fmt: skip
    assert await conn.fetchval(FINGERPRINT) == before
    assert await conn.fetchval(INDEXES) == indexes  # partition indexes keep their names
    assert await conn.fetchval(STAGING_TABLES) == 0
    assert await conn.fetchval("SELECT nextval('orders_id_seq')") == ARGS["orders"] + 1
    await seed(conn, progress=False, **ARGS)


@pytest.mark.parametrize(
    ("failing", "parallel"), [("order_items", True), ("orders_p", True), ("products", True), ("order_items", False)]
)
async def test_parallel_failure_keeps_previous_data_and_leaves_no_staging_tables(
    seeded: SeedSummary,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
    parallel: bool,
    db_url: str,
) -> None:
    """A COPY fails while order_items are staged, while orders are staged, or in the swap transaction
    (after the orders' staging tables were committed); and the single-transaction path for comparison."""
    before = await conn.fetchval(FINGERPRINT)
    indexes = await conn.fetchval(INDEXES)
    real_copy = binary_module._copy  # what db.seed.load calls as `_copy`

    async def failing_copy(connection: asyncpg.Connection, table: str, *args: Any) -> None:
        if failing in table:
            raise RuntimeError("disk full")
        await real_copy(connection, table, *args)

    monkeypatch.setattr(seed_module, "_copy", failing_copy)
    with pytest.raises(RuntimeError, match="disk full"):
        await seed(conn, progress=False, parallel=parallel, dsn=db_url, rebuild_indexes=True, **{**ARGS, "seed": 99})
    assert not conn.is_in_transaction()
    assert await conn.fetchval(FINGERPRINT) == before
    assert await conn.fetchval(INDEXES) == indexes
    assert await conn.fetchval(STAGING_TABLES) == 0
