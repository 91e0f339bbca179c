"""The views domain: the analytics rollups stay equal, row for row, to a rebuild from orders whatever changes and in
whatever order (a property test), changes committed during a refresh are never lost, local days follow the
configured timezone, overlapping runs skip instead of blocking, and the jobs run end to end through a real worker."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import db.migrate as migrations
from db.migrate import sqlalchemy_url, upgrade
from db.queries.views import ALL_VIEWS, FIRST_ORDERS, Family, RefreshLimits, rebuild, refresh_family
from db.seed import CATEGORIES, STATUSES
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst, wait_for
from tests.test_api import TRIGGER, gql
from worker import client
from worker.jobs.views import (
    refresh_daily_materialized_views,
    refresh_realtime_materialized_views,
)

# An oracle written apart from db/queries/views.py: the rollups against plain aggregates over orders (UTC days, the
# suite's timezone).
VIEW_VS_BASE = {
    "mv_hourly_sales_metrics": (
        """SELECT hour, orders_count, paid_orders, revenue, units, unique_customers, cancelled_orders,
                  refunded_orders, refunded_amount FROM mv_hourly_sales_metrics""",
        """SELECT h, n, paid, revenue, coalesce(units, 0), customers, cancelled, refunded, refunded_amount
             FROM (SELECT date_trunc('hour', created_at AT TIME ZONE 'UTC') AS h, count(*) AS n,
                          count(*) FILTER (WHERE status IN ('paid','shipped','delivered')) AS paid,
                          coalesce(sum(total_amount) FILTER (WHERE status IN ('paid','shipped','delivered')), 0)
                              AS revenue,
                          count(DISTINCT customer_id) AS customers,
                          count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                          count(*) FILTER (WHERE status = 'refunded') AS refunded,
                          coalesce(sum(total_amount) FILTER (WHERE status = 'refunded'), 0) AS refunded_amount
                     FROM orders GROUP BY 1) o
             LEFT JOIN (SELECT date_trunc('hour', p.created_at AT TIME ZONE 'UTC') AS h, sum(i.quantity) AS units
                          FROM order_items i JOIN orders p ON p.id = i.order_id AND p.created_at = i.created_at
                         WHERE p.status IN ('paid','shipped','delivered') GROUP BY 1) u USING (h)""",
    ),
    "mv_daily_sales_summary": (
        """SELECT day, orders_count, revenue, refunded_amount, unique_customers, new_customers, returning_customers
             FROM mv_daily_sales_summary""",
        """SELECT d, count(*),
                  coalesce(sum(total_amount) FILTER (WHERE status IN ('paid','shipped','delivered')), 0),
                  coalesce(sum(total_amount) FILTER (WHERE status = 'refunded'), 0),
                  count(DISTINCT customer_id), count(DISTINCT customer_id) FILTER (WHERE d = first_day),
                  count(DISTINCT customer_id) FILTER (WHERE d > first_day)
             FROM (SELECT (created_at AT TIME ZONE 'UTC')::date AS d, total_amount, status, customer_id,
                          (min(created_at) OVER (PARTITION BY customer_id) AT TIME ZONE 'UTC')::date AS first_day
                     FROM orders) o
            GROUP BY 1""",
    ),
    "mv_daily_category_sales": (
        "SELECT day, category, units, revenue, orders_count FROM mv_daily_category_sales",
        """SELECT (o.created_at AT TIME ZONE 'UTC')::date, p.category, sum(i.quantity),
                  sum(i.quantity * i.unit_price), count(DISTINCT o.id)
             FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
             JOIN products p ON p.id = i.product_id
            WHERE o.status IN ('paid','shipped','delivered') GROUP BY 1, 2""",
    ),
    "mv_daily_product_sales": (
        "SELECT day, product_id, units, revenue, orders_count FROM mv_daily_product_sales",
        """SELECT (o.created_at AT TIME ZONE 'UTC')::date, i.product_id, sum(i.quantity),
                  sum(i.quantity * i.unit_price), count(DISTINCT o.id)
             FROM orders o JOIN order_items i ON i.order_id = o.id AND i.created_at = o.created_at
            WHERE o.status IN ('paid','shipped','delivered') GROUP BY 1, 2""",
    ),
}

KEYS = {
    "mv_hourly_sales_metrics": "hour",
    "mv_daily_sales_summary": "day",
    "mv_daily_product_sales": "day, product_id",
    "mv_daily_category_sales": "day, category",
    FIRST_ORDERS: "customer_id",
}
FAMILY_TABLES = {
    Family.REALTIME: ["mv_hourly_sales_metrics"],
    Family.DAILY: [FIRST_ORDERS, "mv_daily_sales_summary", "mv_daily_product_sales", "mv_daily_category_sales"],
}
JOBS: dict[Family, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    Family.REALTIME: refresh_realtime_materialized_views,
    Family.DAILY: refresh_daily_materialized_views,
}
NOW = datetime.now(UTC)  # the seeded orders end here


@pytest.fixture(scope="module")
async def seeded(db: asyncpg.Pool) -> None:
    from db.seed import seed

    async with db.acquire() as conn:
        await seed(conn, customers=300, products=40, orders=3_000, months=3, seed=7, progress=False, now=NOW)


def job_ctx(db: asyncpg.Pool, timezone: str = "UTC") -> dict[str, Any]:
    """What a worker hands a job, with the store's timezone set through the settings object."""
    return {"db": db, "settings": get_settings().model_copy(update={"timezone": timezone})}


async def snapshot(conn: asyncpg.Connection, tables: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY {KEYS[t]}")] for t in tables}


async def assert_equals_rebuild(db: asyncpg.Pool, family: Family, timezone: str) -> None:
    """The family's tables, row for row, against what a full rebuild makes of them (rolled back)."""
    async with db.acquire() as conn:
        actual = await snapshot(conn, FAMILY_TABLES[family])
        transaction = conn.transaction()
        await transaction.start()
        try:
            await rebuild(conn, family, timezone=timezone)
            expected = await snapshot(conn, FAMILY_TABLES[family])
        finally:
            await transaction.rollback()
    for table, rows in expected.items():
        missing = sorted(set(rows) - set(actual[table]))[:3]
        extra = sorted(set(actual[table]) - set(rows))[:3]
        assert actual[table] == rows, f"{table} ({timezone}): missing {missing}, unexpected {extra}"


async def refresh_both(db: asyncpg.Pool, timezone: str = "UTC") -> list[dict[str, Any]]:
    return [await JOBS[family](job_ctx(db, timezone)) for family in Family]


async def refresh_family_with_pool(db: asyncpg.Pool, family: Family, timezone: str = "UTC") -> Any:
    async with db.acquire() as conn:
        return await refresh_family(conn, family, timezone=timezone)


async def pending_buckets(db: asyncpg.Pool, family: Family) -> set[datetime]:
    return {r["bucket"] for r in await db.fetch("SELECT bucket FROM rollup_invalidations WHERE family = $1", family)}


async def insert_order(
    conn: asyncpg.Connection,
    created_at: datetime,
    *,
    customer: int = 1,
    status: str = "paid",
    lines: list[tuple[int, int, int]] | None = None,
) -> int:
    """An order with its items (product, quantity, unit price in cents); total_amount is their sum."""
    lines = [(1, 1, 1000)] if lines is None else lines
    total = Decimal(sum(q * c for _, q, c in lines)).scaleb(-2)
    async with conn.transaction():
        order_id: int = await conn.fetchval(
            "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
            customer, status, total, created_at,
        )  # fmt: skip
        if lines:
            await conn.execute(
                """INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at)
                   SELECT $1, n, p, q, c / 100.0, $2
                     FROM unnest($3::bigint[], $4::int[], $5::int[]) WITH ORDINALITY AS l (p, q, c, n)""",
                order_id, created_at, [p for p, _, _ in lines], [q for _, q, _ in lines], [c for _, _, c in lines],
            )  # fmt: skip
    return order_id


# --------------------------------------------------------------------------------------------------
# End to end through a worker (kept from the materialized views: same names, same readers)
# --------------------------------------------------------------------------------------------------


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
    result = status.json()["result"]
    assert result["family"] == "all" and result["mode"] == "rebuild" and not result["skipped"]
    assert {v["view"] for v in result["views"]} == {*ALL_VIEWS, FIRST_ORDERS}
    assert all(v["rows"] > 0 for v in result["views"])

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
    """Refreshes through the worker pick up an order added since."""
    await refresh_both(db)
    before = await db.fetchval("SELECT coalesce(sum(revenue), 0) FROM mv_daily_sales_summary")
    await db.execute("""INSERT INTO orders (customer_id, status, total_amount, created_at)
                        VALUES ((SELECT min(id) FROM customers), 'paid', 123.45, now() - interval '1 hour')""")
    jobs = [
        await client.enqueue_task(clean_redis, OPERATOR, name)
        for name in ("refresh_daily_materialized_views", "refresh_realtime_materialized_views")
    ]
    assert arq_burst("analytics").returncode == 0
    for job in jobs:
        status = await client.job_status(clean_redis, db, job.task_id)
        assert status is not None and status.status == "complete"
        assert status.result["mode"] == "incremental" and not status.result["skipped"], status.result
    after = await db.fetchval("SELECT sum(revenue) FROM mv_daily_sales_summary")
    assert after - before == Decimal("123.45")


# --------------------------------------------------------------------------------------------------
# The property: any interleaving of changes and refreshes leaves the rollups equal to a rebuild
# --------------------------------------------------------------------------------------------------

ZONES = ["UTC", "Pacific/Auckland", "Asia/Kathmandu", "America/St_Johns"]  # +13/+12, +5:45, -3:30/-2:30
MINUTES_BACK = st.integers(min_value=0, max_value=80 * 24 * 60)  # now .. 80 days back: late changes included
CUSTOMER = st.integers(min_value=1, max_value=320)  # some have no orders yet
PICK = st.integers(min_value=0, max_value=4_000)  # an order, counted from the newest
PRODUCT = st.integers(min_value=1, max_value=44)  # 41..44 do not exist: their items have no category
LINE = st.tuples(PRODUCT, st.integers(min_value=1, max_value=4), st.integers(min_value=50, max_value=9_999))
STEP = st.one_of(
    st.tuples(st.just("insert"), CUSTOMER, MINUTES_BACK, st.sampled_from(STATUSES), st.lists(LINE, max_size=3)),
    st.tuples(st.just("copy"), CUSTOMER, MINUTES_BACK, st.sampled_from(STATUSES)),
    st.tuples(st.just("status"), PICK, st.sampled_from(STATUSES)),
    st.tuples(st.just("bulk_status"), MINUTES_BACK, st.sampled_from(STATUSES)),
    st.tuples(st.just("customer"), PICK, CUSTOMER),
    st.tuples(st.just("move"), PICK, MINUTES_BACK),
    st.tuples(st.just("delete"), PICK),
    st.tuples(st.just("item"), PICK, st.integers(min_value=0, max_value=4)),
    st.tuples(st.just("category"), PRODUCT, st.sampled_from([*CATEGORIES[:3], "Gift cards"])),
    st.tuples(st.just("refresh"), st.sampled_from(list(Family))),
)


def _at(minutes_back: int) -> datetime:
    return NOW - timedelta(minutes=minutes_back, seconds=7)


async def _pick(conn: asyncpg.Connection, pick: int) -> asyncpg.Record:
    return await conn.fetchrow(
        "SELECT id, created_at FROM orders ORDER BY id DESC OFFSET $1 % (SELECT count(*) FROM orders) LIMIT 1", pick
    )


async def _insert(conn: asyncpg.Connection, customer: int, minutes: int, status: str, lines: list[Any]) -> None:
    unique = list({p: (p, q, c) for p, q, c in lines}.values())  # one line per product, as a shop has it
    await insert_order(conn, _at(minutes), customer=customer, status=status, lines=unique)


async def _copy(conn: asyncpg.Connection, customer: int, minutes: int, status: str) -> None:
    # COPY into the partitioned parent: its statement triggers see the rows
    records = [(customer, status, Decimal("12.34"), _at(minutes)), (customer, "paid", Decimal("5.00"), _at(minutes))]
    await conn.copy_records_to_table(
        "orders", records=records, columns=["customer_id", "status", "total_amount", "created_at"]
    )


async def _status(conn: asyncpg.Connection, pick: int, status: str) -> None:
    order = await _pick(conn, pick)
    await conn.execute("UPDATE orders SET status = $3 WHERE id = $1 AND created_at = $2", *order, status)


async def _bulk_status(conn: asyncpg.Connection, minutes: int, status: str) -> None:
    await conn.execute(
        "UPDATE orders SET status = $2 WHERE created_at >= $1::timestamptz - interval '1 hour' AND created_at < $1",
        _at(minutes), status,
    )  # fmt: skip


async def _customer(conn: asyncpg.Connection, pick: int, customer: int) -> None:
    order = await _pick(conn, pick)
    await conn.execute("UPDATE orders SET customer_id = $3 WHERE id = $1 AND created_at = $2", *order, customer)


async def _move(conn: asyncpg.Connection, pick: int, minutes: int) -> None:
    """A corrected order time: the order and its items move together (maybe to another month's partition)."""
    order = await _pick(conn, pick)
    async with conn.transaction():
        await conn.execute("UPDATE orders SET created_at = $3 WHERE id = $1 AND created_at = $2", *order, _at(minutes))
        await conn.execute(
            "UPDATE order_items SET created_at = $3 WHERE order_id = $1 AND created_at = $2", *order, _at(minutes)
        )


async def _delete(conn: asyncpg.Connection, pick: int) -> None:
    order = await _pick(conn, pick)
    async with conn.transaction():
        await conn.execute("DELETE FROM order_items WHERE order_id = $1 AND created_at = $2", *order)
        await conn.execute("DELETE FROM orders WHERE id = $1 AND created_at = $2", *order)


async def _item(conn: asyncpg.Connection, pick: int, quantity: int) -> None:
    """Change the quantity of an order's first line; 0 removes the line."""
    order = await _pick(conn, pick)
    first_line = "line_no = (SELECT min(line_no) FROM order_items WHERE order_id = $1 AND created_at = $2)"
    if quantity == 0:
        await conn.execute(f"DELETE FROM order_items WHERE order_id = $1 AND created_at = $2 AND {first_line}", *order)
    else:
        await conn.execute(
            f"UPDATE order_items SET quantity = $3 WHERE order_id = $1 AND created_at = $2 AND {first_line}",
            *order, quantity,
        )  # fmt: skip


async def _category(conn: asyncpg.Connection, product: int, category: str) -> None:
    await conn.execute("UPDATE products SET category = $2 WHERE id = $1", product, category)


CHANGES: dict[str, Callable[..., Awaitable[None]]] = {
    "insert": _insert, "copy": _copy, "status": _status, "bulk_status": _bulk_status, "customer": _customer,
    "move": _move, "delete": _delete, "item": _item, "category": _category,
}  # fmt: skip


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(zone=st.sampled_from(ZONES), steps=st.lists(STEP, min_size=1, max_size=12))
async def test_incremental_refreshes_equal_a_rebuild(
    seeded: None, db: asyncpg.Pool, zone: str, steps: list[tuple[Any, ...]]
) -> None:
    await refresh_both(db, zone)  # the state to start from: the zone's rollups, nothing pending
    for kind, *params in steps:
        if kind == "refresh":
            family = params[0]
            result = await JOBS[family](job_ctx(db, zone))
            assert result["family"] == family.value and not result["skipped"]
            assert result["mode"] == "incremental" or "changed (over" in result["reason"], result
            await assert_equals_rebuild(db, family, zone)
        else:
            async with db.acquire() as conn:
                await CHANGES[kind](conn, *params)
    for family in Family:
        await JOBS[family](job_ctx(db, zone))
        await assert_equals_rebuild(db, family, zone)
        assert not await pending_buckets(db, family)


# --------------------------------------------------------------------------------------------------
# Named cases: late changes, cost proportional to the change, change capture at its edges
# --------------------------------------------------------------------------------------------------


async def test_late_changes_count_and_cost_only_their_buckets(seeded: None, db: asyncpg.Pool) -> None:
    """An order inserted weeks late, cancelled days later, then a product moved to another category: each refresh
    recomputes the order's hour or day (and the product's days) and nothing else."""
    await refresh_both(db)
    old = (NOW - timedelta(days=40)).replace(minute=10)
    async with db.acquire() as conn:
        order_id = await insert_order(conn, old, customer=7, lines=[(3, 2, 1500)])
    realtime, daily = await refresh_both(db)
    assert (realtime["hours"], daily["days"]) == (1, 1)
    hour = old.replace(minute=0, second=0, microsecond=0, tzinfo=None)
    assert await db.fetchval("SELECT units FROM mv_hourly_sales_metrics WHERE hour = $1", hour) >= 2

    revenue = await db.fetchval("SELECT revenue FROM mv_daily_sales_summary WHERE day = $1", old.date())
    await db.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", order_id)
    realtime, daily = await refresh_both(db)
    assert (realtime["hours"], daily["days"]) == (1, 1)
    after = await db.fetchrow("SELECT revenue, cancelled_orders FROM mv_daily_sales_summary WHERE day = $1", old.date())
    assert revenue - after["revenue"] == Decimal("30.00") and after["cancelled_orders"] >= 1

    product, sold_days = await db.fetchrow(
        """SELECT product_id, count(DISTINCT (created_at AT TIME ZONE 'UTC')::date) FROM order_items
            GROUP BY 1 HAVING count(DISTINCT (created_at AT TIME ZONE 'UTC')::date) BETWEEN 2 AND 20
            ORDER BY 2 DESC LIMIT 1"""
    )  # sold on a few days: recomputing them costs less than a rebuild
    await db.execute("UPDATE products SET category = 'Moved' WHERE id = $1", product)
    assert not await pending_buckets(db, Family.REALTIME)  # categories are daily only
    realtime, daily = await refresh_both(db)
    assert realtime["buckets"] == 0 and daily["mode"] == "incremental" and daily["days"] == sold_days
    assert await db.fetchval("SELECT count(*) FROM mv_daily_category_sales WHERE category = 'Moved'") > 0
    await assert_equals_rebuild(db, Family.DAILY, "UTC")


async def test_changes_all_over_the_history_rebuild_the_family(seeded: None, db: asyncpg.Pool) -> None:
    """Past a quarter of the hours or days, recomputing them one by one costs more than a rebuild: the refresh
    rebuilds the family instead, and says why."""
    await refresh_both(db)
    await db.execute(
        """UPDATE orders SET status = CASE status WHEN 'delivered' THEN 'shipped' WHEN 'shipped' THEN 'delivered'
                                          ELSE status END
            WHERE id % 2 = 0"""
    )
    realtime, daily = await refresh_both(db)
    for result in (realtime, daily):
        assert result["mode"] == "rebuild" and "changed (over 25%): rebuilt" in result["reason"], result
        assert result["buckets"] > 100
    for family in Family:
        await assert_equals_rebuild(db, family, "UTC")
        assert not await pending_buckets(db, family)


async def test_change_capture_edges(seeded: None, db: asyncpg.Pool) -> None:
    """An update that changes no measured column logs nothing; a write addressed to a partition directly bypasses
    the triggers (the loader rebuilds instead); TRUNCATE marks both families stale, so their next refresh rebuilds."""
    await refresh_both(db)
    await db.execute("UPDATE orders SET updated_at = now() WHERE created_at > now() - interval '1 day'")
    assert not await pending_buckets(db, Family.REALTIME)

    partition = f"orders_p{NOW:%Y_%m}"  # ensure_order_partitions' name for the month
    await db.execute(
        f"INSERT INTO {partition} (customer_id, status, total_amount, created_at) VALUES (1, 'paid', 1, $1)", NOW
    )
    assert not await pending_buckets(db, Family.REALTIME)
    await db.execute(f"DELETE FROM {partition} WHERE created_at = $1 AND total_amount = 1", NOW)

    async with db.acquire() as conn:
        transaction = conn.transaction()  # rolled back: the seeded data stays
        await transaction.start()
        try:
            await conn.execute("TRUNCATE order_items")
            assert await conn.fetchval("SELECT count(*) FROM rollup_state WHERE timezone IS NULL") == 2
            outcome = await refresh_family(conn, Family.REALTIME, timezone="UTC")
            assert outcome.mode == "rebuild" and "not built" in outcome.reason
            assert await conn.fetchval("SELECT sum(units) FROM mv_hourly_sales_metrics") == 0
        finally:
            await transaction.rollback()


# --------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------


class TableLock:
    """Another session holding a table in EXCLUSIVE mode: a refresh that reaches the table waits there."""

    def __init__(self, db: asyncpg.Pool, table: str) -> None:
        self.db, self.table = db, table
        self.conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> TableLock:
        self.conn = await self.db.acquire()
        self.transaction = self.conn.transaction()
        await self.transaction.start()
        await self.conn.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
        return self

    async def release(self) -> None:
        if self.conn is not None:
            await self.transaction.rollback()
            await self.db.release(self.conn)
            self.conn = None

    async def __aexit__(self, *_: object) -> None:
        await self.release()


async def _waiting_for_lock(db: asyncpg.Pool, pid: int) -> bool:
    return bool(await db.fetchval("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", pid))


async def test_a_change_committed_during_a_refresh_is_picked_up_by_the_next(seeded: None, db: asyncpg.Pool) -> None:
    """The refresh has taken the log and waits (a lock on its table holds it there) when another connection
    commits an order: that order's log row survives the refresh, and the next refresh counts the order."""
    await refresh_both(db)
    async with db.acquire() as conn:
        await insert_order(conn, NOW - timedelta(hours=5))
    async with TableLock(db, "mv_hourly_sales_metrics") as held, db.acquire() as refresher:
        running = asyncio.ensure_future(refresh_family(refresher, Family.REALTIME, timezone="UTC"))
        await wait_for(lambda: _waiting_for_lock(db, refresher.get_server_pid()), timeout=10, interval=0.02)
        async with db.acquire() as writer:
            late = NOW - timedelta(hours=9)
            await insert_order(writer, late)
        await held.release()  # the refresh goes on and commits
        first = await asyncio.wait_for(running, timeout=10)
    assert first.mode == "incremental" and first.buckets == 1
    late_bucket = late.replace(minute=late.minute - late.minute % 15, second=0, microsecond=0)
    assert late_bucket in await pending_buckets(db, Family.REALTIME)

    second = await refresh_family_with_pool(db, Family.REALTIME)
    assert second.buckets == 1 and second.hours == 1
    assert not await pending_buckets(db, Family.REALTIME)
    await assert_equals_rebuild(db, Family.REALTIME, "UTC")


async def test_a_change_in_flight_during_a_refresh_is_picked_up_by_the_next(seeded: None, db: asyncpg.Pool) -> None:
    """An order inserted but not committed while a refresh runs is invisible to it, and so is its log row: the
    refresh neither waits for it nor loses it."""
    await refresh_both(db)
    created = NOW - timedelta(hours=30)
    hour = created.replace(minute=0, second=0, microsecond=0, tzinfo=None)
    before = await db.fetchval(
        "SELECT coalesce(max(orders_count), 0) FROM mv_hourly_sales_metrics WHERE hour = $1", hour
    )
    async with db.acquire() as writer:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES (3, 'paid', 9.99, $1)", created
        )
        outcome = await asyncio.wait_for(refresh_family_with_pool(db, Family.REALTIME), timeout=10)
        assert outcome.buckets == 0 and outcome.views[0].view == "mv_hourly_sales_metrics"  # idle, but says so
        await transaction.commit()
    assert (
        await db.fetchval("SELECT coalesce(max(orders_count), 0) FROM mv_hourly_sales_metrics WHERE hour = $1", hour)
        == before
    )
    outcome = await refresh_family_with_pool(db, Family.REALTIME)
    assert outcome.hours == 1
    assert await db.fetchval("SELECT orders_count FROM mv_hourly_sales_metrics WHERE hour = $1", hour) == before + 1


async def test_two_refreshes_at_once_one_runs_one_skips(seeded: None, db: asyncpg.Pool) -> None:
    """Started together, one refresh of a family runs and the other reports skipped at once; a rebuild waits for
    the running one instead, and gives up with lock_timeout when that takes too long. Nothing deadlocks."""
    await refresh_both(db)
    async with db.acquire() as conn:
        await insert_order(conn, NOW - timedelta(hours=2))
    async with (
        TableLock(db, "mv_daily_sales_summary") as held,
        db.acquire() as first_conn,
        db.acquire() as second_conn,
        db.acquire() as rebuild_conn,
    ):
        first = asyncio.ensure_future(refresh_family(first_conn, Family.DAILY, timezone="UTC"))
        await wait_for(lambda: _waiting_for_lock(db, first_conn.get_server_pid()), timeout=10, interval=0.02)
        second = await asyncio.wait_for(refresh_family(second_conn, Family.DAILY, timezone="UTC"), timeout=5)
        assert second.skipped and second.mode == "skipped" and second.views == []
        with pytest.raises(asyncpg.exceptions.LockNotAvailableError):  # SQLSTATE 55P03: the engine retries it
            await rebuild(rebuild_conn, timezone="UTC", limits=RefreshLimits(lock_timeout_s=0.2))
        repair = asyncio.ensure_future(rebuild(rebuild_conn, timezone="UTC"))  # waits for the first
        await held.release()
        ran = await asyncio.wait_for(first, timeout=10)
        repaired = await asyncio.wait_for(repair, timeout=30)
    assert ran.mode == "incremental" and not ran.skipped and ran.days == 1
    assert repaired.mode == "rebuild" and repaired.family == "all" and repaired.buckets == 1  # the realtime row


async def test_statement_timeout_bounds_a_refresh(seeded: None, db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):
            await rebuild(conn, timezone="UTC", limits=RefreshLimits(statement_timeout_s=0.001))


# --------------------------------------------------------------------------------------------------
# Local days
# --------------------------------------------------------------------------------------------------


async def test_a_store_in_auckland_gets_its_local_days(seeded: None, db: asyncpg.Pool) -> None:
    """Daily rows are Pacific/Auckland days (UTC+13 in January, +12 in July, a 25-hour day when DST ends on 6 April
    2025); hourly rows stay UTC hours. The timezone comes from the settings object the job is given."""
    auckland = job_ctx(db, "Pacific/Auckland")
    customer = 900_001  # no other orders: new on its first local day, returning after
    await db.execute("SELECT ensure_order_partitions('2025-01-01', '2025-07-31')")
    instants = [
        datetime(2025, 1, 10, 10, 59, tzinfo=UTC),  # 23:59 on 10 January in Auckland
        datetime(2025, 1, 10, 11, 0, tzinfo=UTC),  # 00:00 on 11 January
        datetime(2025, 4, 5, 11, 30, tzinfo=UTC),  # 00:30 NZDT on 6 April
        datetime(2025, 4, 6, 11, 30, tzinfo=UTC),  # 23:30 NZST on 6 April: the same 25-hour day
        datetime(2025, 7, 10, 11, 59, tzinfo=UTC),  # 23:59 NZST on 10 July
    ]
    async with db.acquire() as conn:
        for instant in instants:
            await insert_order(conn, instant, customer=customer, lines=[(2, 1, 2000)])

    first = await refresh_daily_materialized_views(auckland)
    assert first["mode"] == "rebuild" and "Pacific/Auckland" in first["reason"]  # the state said UTC
    days = {
        r["day"]: (r["orders_count"], r["new_customers"], r["returning_customers"])
        for r in await db.fetch(
            "SELECT * FROM mv_daily_sales_summary WHERE day BETWEEN '2025-01-01' AND '2025-07-31' ORDER BY day"
        )
    }
    assert days == {
        date(2025, 1, 10): (1, 1, 0),
        date(2025, 1, 11): (1, 0, 1),
        date(2025, 4, 6): (2, 0, 1),
        date(2025, 7, 10): (1, 0, 1),
    }
    realtime = await refresh_realtime_materialized_views(auckland)
    assert realtime["mode"] == "incremental" and realtime["hours"] == len(instants)
    hours = await db.fetch("SELECT hour FROM mv_hourly_sales_metrics WHERE hour BETWEEN '2025-01-10' AND '2025-01-11'")
    assert {r["hour"] for r in hours} == {datetime(2025, 1, 10, 10), datetime(2025, 1, 10, 11)}  # UTC hours

    # an earlier order moves the customer's first local day: both days are recomputed
    async with db.acquire() as conn:
        await insert_order(conn, datetime(2025, 1, 9, 20, 0, tzinfo=UTC), customer=customer)  # 09:00, 10 January
        await insert_order(conn, datetime(2025, 1, 8, 10, 0, tzinfo=UTC), customer=customer)  # 23:00, 8 January
    second = await refresh_daily_materialized_views(auckland)
    assert second["mode"] == "incremental" and second["days"] == 2  # 8 January (new) and 10 January (no longer)
    jan = await db.fetch(
        """SELECT day, orders_count, new_customers FROM mv_daily_sales_summary
            WHERE day BETWEEN '2025-01-08' AND '2025-01-11' ORDER BY day"""
    )
    assert [tuple(r) for r in jan] == [
        (date(2025, 1, 8), 1, 1),
        (date(2025, 1, 10), 2, 0),
        (date(2025, 1, 11), 1, 0),
    ]
    await assert_equals_rebuild(db, Family.DAILY, "Pacific/Auckland")
    again = await refresh_daily_materialized_views(job_ctx(db))  # back to the suite's UTC: rebuilt once more
    assert again["mode"] == "rebuild"


# --------------------------------------------------------------------------------------------------
# The migration
# --------------------------------------------------------------------------------------------------


async def test_migration_0002_goes_down_to_the_views_and_up_again(db: asyncpg.Pool) -> None:
    """On a scratch database: downgrade to 0001 brings the materialized views back, upgrade makes them tables with
    primary keys and triggers again, the first refreshes of a database with orders rebuild from them."""
    server = os.environ["DATABASE_URL"].rsplit("/", 1)[0]
    name = f"salesdash_views_migration_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    url = f"{server}/{name}"
    try:
        await asyncio.to_thread(upgrade, url)
        config = Config(str(Path(migrations.__file__).with_name("alembic.ini")))
        config.attributes["url"] = sqlalchemy_url(url)
        await asyncio.to_thread(command.downgrade, config, "0001")
        conn = await asyncpg.connect(url)
        try:
            kinds = await conn.fetch(
                "SELECT relname, relkind::text FROM pg_class WHERE relname = ANY ($1)", list(ALL_VIEWS)
            )
            assert {r["relkind"] for r in kinds} == {"m"} and len(kinds) == 4
            await conn.execute("SELECT ensure_order_partitions(now()::date, now()::date)")
            await conn.execute(
                "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES (1, 'paid', 5, now())"
            )
            await asyncio.to_thread(upgrade, url)
            tables = await conn.fetch(
                """SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                    WHERE c.relname = ANY ($1) AND c.relkind = 'r'""",
                list(ALL_VIEWS),
            )
            assert len(tables) == 4
            triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'rollup_%'")
            assert triggers == 3 + 3 + 2 + 3  # orders, order_items, products, TRUNCATE on the three
            outcome = await refresh_family(conn, Family.REALTIME, timezone="UTC")
            assert outcome.mode == "rebuild" and outcome.hours == 1
        finally:
            await conn.close()
    finally:
        await db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
