"""The partitions domain, in a private database whose orders span 31 months (M-30 .. M, M the current UTC month)
plus the premade ones: retention drops exactly the months wholly older than the cutoff, keeps every row of the rest,
leaves the rollups' history alone, finishes what an interrupted run left (a backend killed mid-detach, a worker
SIGKILLed mid-detach, a detach that committed without its drop), retries lock timeouts, and never touches the
current, a future or the last partition. The tests run in file order: each retires a few more old months."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from db.queries import partitions as q
from db.queries.views import Family, rebuild, refresh_family
from salesdash.auth import OPERATOR
from salesdash.config import Settings
from salesdash.periods import Month
from tests.conftest import wait_for
from tests.private_db import private_database, settings_for
from tests.test_api import queue_snapshot
from worker import client
from worker.jobs import partitions as jobs
from worker.registry import TaskArgumentError, get_task

CURRENT = Month.current(UTC)
FIRST = CURRENT.plus(-30)
APP = "salesdash:clean_old_order_partitions"


def _names(*months: Month) -> list[str]:
    """Partition names in retirement order: per month, order_items then orders."""
    return [f"public.{table}_p{m.year:04d}_{m.month:02d}" for m in months for table in ("order_items", "orders")]


def _span(first: int, last: int) -> list[Month]:
    return [CURRENT.plus(k) for k in range(first, last + 1)]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with private_database("salesdash_test_partitions") as url:
        yield url


_ORDERS = """
INSERT INTO orders (customer_id, status, total_amount, created_at)
SELECT 1 + n % 5, 'paid', 10 + n, (m + interval '14 days 12 hours' + n * interval '1 minute') AT TIME ZONE 'UTC'
  FROM generate_series($1::timestamp, $2::timestamp, interval '1 month') AS m,
       LATERAL generate_series(1, 1 + extract(month FROM m)::int % 4) AS n"""
_ITEMS = """
INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at)
SELECT o.id, l, 1, l, 5, o.created_at FROM orders o, generate_series(1, 1 + o.id::int % 2) AS l"""


@pytest.fixture(scope="module")
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    """Partitions M-30 .. M+3, a few orders and items in every month up to the current one (a different count per
    month), and rollups rebuilt over all of them."""
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute("SELECT ensure_order_partitions($1, $2)", FIRST.first_day, CURRENT.plus(3).first_day)
        await conn.execute("INSERT INTO products (sku, name, category, price, cost) VALUES ('s', 'p', 'c', 5, 1)")
        await conn.execute(_ORDERS, *(datetime.combine(m.first_day, datetime.min.time()) for m in (FIRST, CURRENT)))
        await conn.execute(_ITEMS)
        await rebuild(conn, timezone="UTC")
    yield pool
    await pool.close()


@pytest.fixture
def ctx(database: str, pool: asyncpg.Pool) -> dict[str, Any]:
    return {"db": pool, "settings": settings_for(database, timezone="UTC", partition_lock_timeout=5.0)}


async def _attached(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        """SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE i.inhparent IN ('orders'::regclass, 'order_items'::regclass)"""
    )
    return {r["name"] for r in rows}


async def _tables(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT 'public.' || relname AS name FROM pg_class WHERE relname ~ '^(orders|order_items)_p' AND relkind = 'r'"
    )
    return {r["name"] for r in rows}


async def _rows_per_month(pool: asyncpg.Pool) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for table in ("orders", "order_items"):
        rows = await pool.fetch(
            f"SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month, count(*) AS n FROM {table} GROUP BY 1"
        )
        counts[table] = {r["month"]: r["n"] for r in rows}
    return counts


async def _rollups(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    return {
        view: [tuple(r) for r in await pool.fetch(f"SELECT * FROM {view} ORDER BY 1, 2")]
        for view in ("mv_hourly_sales_metrics", "mv_daily_sales_summary", "mv_daily_product_sales")
    }


async def _pending(pool: asyncpg.Pool, name: str) -> bool:
    pending: bool | None = await pool.fetchval(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1)", name
    )
    return bool(pending)


def _dropped(result: dict[str, Any], key: str = "dropped") -> list[str]:
    return [p["partition"] for p in result[key]]


def _without(counts: dict[str, dict[str, int]], months: list[Month]) -> dict[str, dict[str, int]]:
    gone = {str(m) for m in months}
    return {table: {m: n for m, n in per.items() if m not in gone} for table, per in counts.items()}


async def test_the_data_spans_31_months(pool: asyncpg.Pool) -> None:
    counts = await _rows_per_month(pool)
    assert sorted(counts["orders"]) == [str(m) for m in _span(-30, 0)]
    assert _names(*_span(-30, 3)) and set(_names(*_span(-30, 3))) == await _attached(pool)


async def test_a_dry_run_lists_the_old_months_and_changes_nothing(ctx: dict[str, Any], pool: asyncpg.Pool) -> None:
    before = (await _attached(pool), await _rows_per_month(pool))
    result = await jobs.clean_old_order_partitions(ctx, dry_run=True)
    assert result["dry_run"] is True and result["skipped"] is False
    assert _dropped(result) == _names(*_span(-30, -25))
    assert result["cutoff"] == datetime.combine(CURRENT.plus(-24).first_day, datetime.min.time(), UTC).isoformat()
    assert result["created"] == [] and result["finished"] == [] and result["blocked"] == []
    assert (await _attached(pool), await _rows_per_month(pool)) == before
    assert await pool.fetchval("SELECT count(*) FROM order_partition_drops") == 0


async def test_retention_drops_exactly_the_months_wholly_older_than_24_and_keeps_every_row_of_the_rest(
    ctx: dict[str, Any], pool: asyncpg.Pool
) -> None:
    counts, rollups = await _rows_per_month(pool), await _rollups(pool)
    assert await pool.fetchval("SELECT count(*) FROM rollup_invalidations") == 0
    result = await jobs.clean_old_order_partitions(ctx)
    old = _span(-30, -25)
    assert _dropped(result) == _names(*old)  # oldest first, order_items before orders
    assert all(p["tries"] == 1 and not p["finalized"] for p in result["dropped"])
    assert await _attached(pool) == set(_names(*_span(-24, 3)))
    assert not (set(_names(*old)) & await _tables(pool))  # dropped, not just detached
    assert await _rows_per_month(pool) == _without(counts, old)  # every row of the kept months
    ledger = await pool.fetch("SELECT partition, state FROM order_partition_drops ORDER BY id")
    assert [(r["partition"], r["state"]) for r in ledger] == [(n, "dropped") for n in _names(*old)]
    # DETACH and DROP fire no row, statement or TRUNCATE triggers: nothing logged, nothing marked for a rebuild, and
    # the rollups keep the dropped months' history through an incremental refresh
    assert await pool.fetchval("SELECT count(*) FROM rollup_invalidations") == 0
    assert await pool.fetchval("SELECT count(*) FROM rollup_state WHERE timezone IS NULL") == 0
    async with pool.acquire() as conn:
        for family in Family:
            outcome = await refresh_family(conn, family, timezone="UTC")
            assert outcome.mode == "incremental" and outcome.buckets == 0
    assert await _rollups(pool) == rollups
    assert min(r[0] for r in rollups["mv_daily_sales_summary"]) < CURRENT.plus(-24).first_day


async def test_a_second_run_is_a_no_op(ctx: dict[str, Any], pool: asyncpg.Pool) -> None:
    before = (await _attached(pool), await _rows_per_month(pool))
    result = await jobs.clean_old_order_partitions(ctx)
    assert (result["created"], result["finished"], result["dropped"]) == ([], [], [])
    assert (await _attached(pool), await _rows_per_month(pool)) == before


async def _start_blocked_detach(database: str, name: str, blocker: asyncpg.Connection) -> tuple[Any, int]:
    """DETACH ... CONCURRENTLY on a connection of its own while `blocker` holds a lock on orders: the detach commits
    its first transaction (the partition is pending) and waits for the blocker."""
    detacher = await asyncpg.connect(database)
    pid = detacher.get_server_pid()
    task = asyncio.create_task(detacher.execute(f"ALTER TABLE public.orders DETACH PARTITION {name} CONCURRENTLY"))
    return task, pid


async def test_a_pending_detach_left_by_a_killed_backend_is_finalized_by_the_next_run(
    database: str, ctx: dict[str, Any], pool: asyncpg.Pool
) -> None:
    victim = _names(CURRENT.plus(-24))[1]  # public.orders_p<M-24>
    counts = await _rows_per_month(pool)
    blocker = await asyncpg.connect(database)
    hold = blocker.transaction()
    await hold.start()
    await blocker.fetchval("SELECT count(*) FROM orders")
    task, pid = await _start_blocked_detach(database, victim, blocker)
    await wait_for(lambda: _pending(pool, victim), timeout=10, interval=0.05)
    assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError)):
        await task
    await hold.rollback()
    await blocker.close()
    assert await _pending(pool, victim)  # left half-detached: no new DETACH CONCURRENTLY works on orders now

    result = await jobs.clean_old_order_partitions(ctx, retention_months=22)
    assert _dropped(result) == _names(*_span(-24, -23))
    assert [p["finalized"] for p in result["dropped"]] == [False, True, False, False]
    assert await _attached(pool) == set(_names(*_span(-22, 3)))
    assert await _rows_per_month(pool) == _without(counts, _span(-24, -23))


async def test_a_worker_killed_mid_detach_is_finished_by_the_next_run(
    database: str, ctx: dict[str, Any], pool: asyncpg.Pool, clean_redis: Redis, spawn_worker: Any
) -> None:
    """A real maintenance worker, SIGKILLed while its DETACH waits: the detach stays pending (its backend notices
    the dead client and gives up), the session lock goes with the backend, and the next run finishes the job."""
    counts = await _rows_per_month(pool)
    first = _names(CURRENT.plus(-22))[0]  # public.order_items_p<M-22>, the first to go
    blocker = await asyncpg.connect(database)
    hold = blocker.transaction()
    await hold.start()
    await blocker.fetchval("SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM order_items)")
    env = {"DATABASE_URL": database, "SALESDASH_TIMEZONE": "UTC", "SALESDASH_PARTITION_LOCK_TIMEOUT": "120"}
    try:
        proc = spawn_worker("worker.maintenance.Settings", extra_env=env)
        await client.enqueue_task(clean_redis, OPERATOR, "clean_old_order_partitions", kwargs={"retention_months": 20})
        await wait_for(lambda: _pending(pool, first), timeout=60, interval=0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        async def backend_gone() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP)

        await wait_for(backend_gone, timeout=15)
    finally:
        await hold.rollback()
        await blocker.close()
        await clean_redis.flushdb()  # the dead worker's job must not be re-run by a later maintenance worker
    assert await _pending(pool, first)
    ledger = await pool.fetch("SELECT partition FROM order_partition_drops WHERE state = 'detaching'")
    assert [r["partition"] for r in ledger] == [first]

    result = await jobs.clean_old_order_partitions(ctx, retention_months=20)
    assert _dropped(result, "finished") == [first] and result["finished"][0]["finalized"] is True
    assert _dropped(result) == _names(*_span(-22, -21))[1:]
    assert await _attached(pool) == set(_names(*_span(-20, 3)))
    assert not (set(_names(*_span(-22, -21))) & await _tables(pool))
    assert await _rows_per_month(pool) == _without(counts, _span(-22, -21))
    assert await pool.fetchval("SELECT count(*) FROM order_partition_drops WHERE state = 'detaching'") == 0


async def test_a_partition_detached_but_not_dropped_is_dropped_by_the_next_run(
    ctx: dict[str, Any], pool: asyncpg.Pool
) -> None:
    """A run killed after its detach committed and before its drop leaves a standalone table and an open ledger
    row: the dry run reports it, the next run drops it."""
    items, orders = _names(CURRENT.plus(-20))
    async with pool.acquire() as conn:
        partition = next(p for p in await q.list_partitions(conn) if p.name == orders)
        await q.record_intent(conn, partition, "killed-run")
        await conn.execute(f"ALTER TABLE public.orders DETACH PARTITION {orders}")
    assert orders in await _tables(pool) and orders not in await _attached(pool)
    dry = await jobs.clean_old_order_partitions(ctx, dry_run=True, retention_months=19)
    assert (_dropped(dry, "finished"), _dropped(dry)) == ([orders], [items])
    assert orders in await _tables(pool)

    result = await jobs.clean_old_order_partitions(ctx, retention_months=19)
    assert _dropped(result, "finished") == [orders] and result["finished"][0]["finalized"] is False
    assert _dropped(result) == [items]
    assert not ({items, orders} & await _tables(pool))
    assert await pool.fetchval("SELECT job_id FROM order_partition_drops WHERE partition = $1", orders) == "killed-run"


async def test_lock_timeouts_are_retried(
    database: str, ctx: dict[str, Any], pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding the partition makes the detach time out (lock_timeout 0.3 s) and leaves it pending; the
    next try, after a pause, finalizes it once the reader is gone."""
    monkeypatch.setattr(jobs, "LOCK_RETRY_PAUSE_S", 0.2)
    ctx = {**ctx, "settings": ctx["settings"].model_copy(update={"partition_lock_timeout": 0.3})}
    items, orders = _names(CURRENT.plus(-19))
    reader = await asyncpg.connect(database)
    hold = reader.transaction()
    await hold.start()
    await reader.fetchval(f"SELECT count(*) FROM {items}")
    run = asyncio.create_task(jobs.clean_old_order_partitions(ctx, retention_months=18))

    async def timed_out_once() -> bool:
        # pending and the job's connection idle: its DETACH statement ended (with the lock timeout), it is pausing
        idle = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle'", APP
        )
        return await _pending(pool, items) and bool(idle)

    try:
        await wait_for(timed_out_once, timeout=20, interval=0.02)
    finally:
        await hold.rollback()
        await reader.close()
    result = await run
    assert _dropped(result) == [items, orders]
    assert result["dropped"][0]["tries"] >= 2 and result["dropped"][0]["finalized"] is True
    assert result["dropped"][1]["tries"] == 1


async def test_never_the_current_a_future_or_the_last_partition(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(  # DDL takes no parameters: a literal bound
            f"CREATE TABLE public.orders_ancient PARTITION OF public.orders "
            f"FOR VALUES FROM (MINVALUE) TO ('{CURRENT.plus(-40).first_day}')"
        )
        try:
            now = await q.db_now(conn)
            partitions = await q.list_partitions(conn)
        finally:
            await conn.execute("DROP TABLE public.orders_ancient")
    # a cutoff in the future (a clock or timezone bug) still spares every month that has not ended
    plan = jobs.plan_retention(partitions, now + timedelta(days=3650), now)
    dropped = {p.name for p in plan.drops}
    assert dropped == set(_names(*_span(-18, -1)))
    assert not ({*_names(*_span(0, 3)), "public.orders_ancient"} & dropped)  # current, future, unbounded
    # a table whose partitions are all old keeps its newest
    only_old = [p for p in partitions if p.range_to is not None and p.range_to <= now]
    plan = jobs.plan_retention(only_old, now, now)
    assert sorted(plan.kept_last) == sorted(_names(CURRENT.plus(-1)))
    assert {p.name for p in plan.drops} == set(_names(*_span(-18, -2)))
    with pytest.raises(ValueError, match="at least 3"):
        jobs.retention_cutoff(now, UTC, 2)


def _partition(parent: str, month: Month, *, pending: bool = False) -> q.Partition:
    start, end = month.bounds(UTC)
    name = f"{parent}_p{month.year:04d}_{month.month:02d}"
    return q.Partition(parent, name, 1, start, end, True, pending, 0, 0)


def test_retention_months_are_local_months() -> None:
    """At 2026-12-01 01:00 UTC, with 24 months: in UTC the cutoff is 2024-12-01 and the 2024-11 partition goes. In
    Auckland (already 14:00 on December 1) the cutoff is its 2024-12-01 00:00, 2024-11-30 11:00 UTC: the UTC
    partition of 2024-11 holds 13 hours of a kept local month and stays. In New York it is still November 30: the
    cutoff is 2024-11-01 00:00 EDT (04:00 UTC) and 2024-11 stays too."""
    now = datetime(2026, 12, 1, 1, tzinfo=UTC)
    zones = ("UTC", "Pacific/Auckland", "America/New_York")
    cutoffs = {zone: jobs.retention_cutoff(now, ZoneInfo(zone), 24) for zone in zones}
    assert cutoffs == {
        "UTC": datetime(2024, 12, 1, tzinfo=UTC),
        "Pacific/Auckland": datetime(2024, 11, 30, 11, tzinfo=UTC),
        "America/New_York": datetime(2024, 11, 1, 4, tzinfo=UTC),
    }
    months = [Month(2024, 9), Month(2024, 10), Month(2024, 11), Month(2024, 12), Month(2026, 12)]
    partitions = [_partition("public.orders", m) for m in months]
    dropped = {z: [p.name for p in jobs.plan_retention(partitions, c, now).drops] for z, c in cutoffs.items()}
    assert dropped == {
        "UTC": ["public.orders_p2024_09", "public.orders_p2024_10", "public.orders_p2024_11"],
        "Pacific/Auckland": ["public.orders_p2024_09", "public.orders_p2024_10"],
        "America/New_York": ["public.orders_p2024_09", "public.orders_p2024_10"],
    }


def test_a_pending_detach_within_retention_blocks_its_table_only() -> None:
    now = datetime(2026, 11, 15, tzinfo=UTC)
    partitions = [
        _partition("public.orders", Month(2024, 1)),
        _partition("public.orders", Month(2026, 5), pending=True),  # someone else's detach
        _partition("public.orders", Month(2026, 11)),
        _partition("public.order_items", Month(2024, 1)),
        _partition("public.order_items", Month(2026, 11)),
    ]
    plan = jobs.plan_retention(partitions, jobs.retention_cutoff(now, UTC, 24), now)
    assert [p.name for p in plan.drops] == ["public.order_items_p2024_01"]
    assert plan.blocked == ["public.orders: public.orders_p2026_05 is pending detach but within retention"]


def test_premake_covers_three_local_months_ahead() -> None:
    # 20:00 on December 31 in New York is already January 1 in UTC; March's last local instant is April 1 UTC
    now = datetime(2027, 1, 1, 1, tzinfo=UTC)
    assert jobs.premake_range(now, ZoneInfo("America/New_York")) == (date(2027, 1, 1), date(2027, 4, 1))
    assert jobs.premake_range(now, UTC) == (date(2027, 1, 1), date(2027, 4, 30))


async def test_create_order_partitions_makes_the_missing_months(
    database: str, ctx: dict[str, Any], pool: asyncpg.Pool
) -> None:
    ahead = _names(CURRENT.plus(3))
    for name in ahead:
        await pool.execute(f"DROP TABLE {name}")  # empty: the month has not begun
    result = await jobs.create_order_partitions(ctx)
    assert result == {
        "skipped": False,
        "created": ahead,
        "through": str(CURRENT.plus(3)),
    }
    assert set(ahead) <= await _attached(pool)
    assert (await jobs.create_order_partitions(ctx))["created"] == []
    async with pool.acquire() as holder:
        assert await q.try_session_lock(holder)  # a retention run in progress
        assert (await jobs.create_order_partitions(ctx))["skipped"] is True
        assert (await jobs.clean_old_order_partitions(ctx))["skipped"] is True
        await holder.execute("SELECT pg_advisory_unlock_all()")


def test_arguments_are_validated_before_enqueueing() -> None:
    spec = get_task("clean_old_order_partitions")
    assert spec.validate([], {}) == {"dry_run": False, "retention_months": None}
    assert spec.validate([], {"dry_run": True, "retention_months": 3}) == {"dry_run": True, "retention_months": 3}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"retention_months": 2}, "retention_months: Input should be greater than or equal to 3"),
        ({"retention_months": 1201}, "retention_months"),
        ({"retention_months": "24"}, "retention_months: Input should be a valid integer"),
        ({"dry_run": "yes"}, "dry_run: Input should be a valid boolean"),
        ({"months": 24}, "months: Extra inputs are not permitted"),
    ]
    for bad, fragment in cases:
        with pytest.raises(TaskArgumentError, match=fragment):
            spec.validate([], bad)


async def test_rest_needs_admin_and_refuses_bad_arguments(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    before = await queue_snapshot(clean_redis)
    body = {"task_name": "clean_old_order_partitions", "kwargs": {"dry_run": True}}
    assert (await app_client.post("/jobs", json=body, headers=auth["trigger"])).status_code == 403
    bad = {"task_name": "clean_old_order_partitions", "kwargs": {"retention_months": 1}}
    refused = await app_client.post("/jobs", json=bad, headers=auth["admin"])
    assert refused.status_code == 422 and "retention_months" in refused.text
    assert await queue_snapshot(clean_redis) == before
    accepted = await app_client.post("/jobs", json=body, headers=auth["admin"])
    assert accepted.status_code == 202 and accepted.json()["queue"] == "maintenance"
    await clean_redis.flushdb()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SALESDASH_ORDER_RETENTION_MONTHS", "2"),
        ("SALESDASH_ORDER_RETENTION_MONTHS", "x"),
        ("SALESDASH_PARTITION_LOCK_TIMEOUT", "0"),
    ],
)
def test_bad_settings_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable):
        Settings()
