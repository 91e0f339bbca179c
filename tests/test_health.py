"""The health domain: `check_system_health` turns the matching check red within one run when a queue's worker stops,
a rollup goes stale, a query runs too long, partitions are missing ahead, connections or Redis memory pass their
bound, a job waits too long, or PostgreSQL does not answer; failing checks become alerts in the notifications outbox
(once, then once per cooldown); the report is the job result and the gauges at /metrics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from db.queries import health as queries
from db.queries.health import ServerStatus
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst, enqueue_job, wait_for
from worker import client, jobstore
from worker.health import last_report
from worker.jobs.health import check_system_health, connections_check, memory_check
from worker.jobs.views import refresh_daily_materialized_views, refresh_realtime_materialized_views


def job_ctx(db: Any, redis: Redis, **settings: Any) -> dict[str, Any]:
    return {"db": db, "redis": redis, "settings": get_settings().model_copy(update=settings)}


def checks_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in result["checks"]}


async def notified(db: asyncpg.Pool, check: str) -> int:
    """Alerts recorded in the notifications outbox for this check in the last hour (worker/alerting.py)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM notifications WHERE kind = 'alert' AND dedupe_key LIKE $1"
            " AND created_at > now() - interval '1 hour'",
            f"alert:{check}:%",
        )
    )


async def test_a_stopped_worker_turns_its_queue_red_and_the_gauges_show_it(
    db: asyncpg.Pool, clean_redis: Redis, spawn_worker: Any, app_client: httpx.AsyncClient
) -> None:
    # other tests may have alerted about this queue already: start from no alert about it
    await db.execute("DELETE FROM notifications WHERE payload->>'check' = 'queue_workers_notifications'")
    await db.execute("DELETE FROM alert_state WHERE alert_key = 'queue_workers_notifications'")
    worker = spawn_worker("worker.notifications.Settings")

    async def registered() -> bool:
        return any(w.queue == "notifications" for w in await client.workers(clean_redis))

    await wait_for(registered)
    before = checks_of(await check_system_health(job_ctx(db, clean_redis)))
    assert before["queue_workers_notifications"]["ok"] and before["queue_workers_notifications"]["values"] == {
        "workers": 1.0
    }
    assert not before["queue_workers_analytics"]["ok"]  # nothing serves analytics in this test

    worker.terminate()  # SIGTERM: the worker stops and leaves the registry
    assert worker.wait(timeout=60) == 0
    result = await check_system_health(job_ctx(db, clean_redis))
    after = checks_of(result)
    assert not after["queue_workers_notifications"]["ok"] and "queue_workers_notifications" in result["failing"]
    assert await notified(db, "queue_workers_notifications") == 1
    again = await check_system_health(job_ctx(db, clean_redis))
    assert again["notifications_recorded"] == 0 and await notified(db, "queue_workers_notifications") == 1

    metrics = (await app_client.get("/metrics")).text
    assert 'salesdash_health_check{check="queue_workers_notifications"} 0.0' in metrics
    assert 'salesdash_health_check{check="postgres_reachable"} 1.0' in metrics
    assert 'salesdash_health_value{check="queue_workers_notifications",measure="workers"} 0.0' in metrics
    assert 'salesdash_health_value{check="postgres_connections",measure="max"}' in metrics
    assert "salesdash_health_checked_timestamp_seconds" in metrics
    stored = await last_report(clean_redis)
    assert stored is not None and stored.checked_at.isoformat() == again["checked_at"].replace("Z", "+00:00")


async def test_a_stale_rollup_turns_its_check_red_until_it_is_refreshed(db: asyncpg.Pool, clean_redis: Redis) -> None:
    views_ctx = {"db": db, "settings": get_settings()}
    await refresh_realtime_materialized_views(views_ctx)
    await refresh_daily_materialized_views(views_ctx)
    # the daily family was refreshed a minute ago by a job; the realtime target is a millisecond
    await db.execute(
        """INSERT INTO job_runs (job_id, task_name, queue, status, finished_at)
           VALUES ($1, 'refresh_daily_materialized_views', 'analytics', 'complete', now() - interval '1 minute')""",
        f"health-test-{datetime.now(UTC).timestamp()}",
    )
    ctx = job_ctx(db, clean_redis, health_realtime_rollup_max_age_s=0.001)
    fresh = checks_of(await check_system_health(ctx))
    assert fresh["rollups_realtime_fresh"]["ok"] and fresh["rollups_realtime_fresh"]["values"]["pending"] == 0

    await db.execute(
        "INSERT INTO orders (customer_id, status, total_amount, created_at) VALUES (1, 'paid', 12.50, now())"
    )
    stale = checks_of(await check_system_health(ctx))
    assert not stale["rollups_realtime_fresh"]["ok"], stale["rollups_realtime_fresh"]
    assert stale["rollups_daily_fresh"]["ok"], stale["rollups_daily_fresh"]  # pending, but within its 2 h
    assert await notified(db, "rollups_realtime_fresh") == 1

    await refresh_realtime_materialized_views(views_ctx)
    assert checks_of(await check_system_health(ctx))["rollups_realtime_fresh"]["ok"]


async def test_a_long_query_turns_its_check_red(db: asyncpg.Pool, clean_redis: Redis) -> None:
    async with db.acquire() as sleeper:
        sleeping = asyncio.create_task(sleeper.execute("SELECT pg_sleep(30)"))
        try:

            async def seen() -> bool:
                async with db.acquire() as conn:
                    return (await queries.server_status(conn, 0.2)).long_queries > 0

            await wait_for(seen, timeout=10, interval=0.05)
            check = checks_of(await check_system_health(job_ctx(db, clean_redis, health_long_query_s=0.2)))
            assert not check["postgres_long_queries"]["ok"] and check["postgres_long_queries"]["values"]["count"] >= 1
        finally:
            await db.execute("SELECT pg_cancel_backend($1)", sleeper.get_server_pid())
            with pytest.raises(asyncpg.QueryCanceledError):
                await sleeping
    assert checks_of(await check_system_health(job_ctx(db, clean_redis, health_long_query_s=0.2)))[
        "postgres_long_queries"
    ]["ok"]


async def test_missing_partitions_ahead_turn_their_check_red(db: asyncpg.Pool, clean_redis: Redis) -> None:
    async with db.acquire() as conn:
        assert await queries.months_covered(conn, 3) == 4  # the migration made the current month and three more
        transaction = conn.transaction()
        await transaction.start()
        try:
            in_two = await conn.fetchval(
                "SELECT to_char(date_trunc('month', now(), 'UTC') + interval '2 months', 'YYYY_MM')"
            )
            await conn.execute(f"DROP TABLE order_items_p{in_two}")  # orders alone is not enough
            assert await queries.months_covered(conn, 3) == 2
        finally:
            await transaction.rollback()
    check = checks_of(await check_system_health(job_ctx(db, clean_redis)))["order_partitions_ahead"]
    assert check["ok"] and check["values"]["months_ahead"] == 3


async def test_a_job_waiting_too_long_turns_its_queue_red(db: asyncpg.Pool, clean_redis: Redis) -> None:
    assert await jobstore.oldest_waiting_ms(clean_redis, "notifications") is None
    job = await client.enqueue_task(clean_redis, OPERATOR, "check_low_stock_products")
    ctx = job_ctx(db, clean_redis, health_queue_wait_max_s=0.001)

    async def red() -> bool:
        return not checks_of(await check_system_health(ctx))["queue_wait_notifications"]["ok"]

    await wait_for(red, timeout=5, interval=0.01)
    assert checks_of(await check_system_health(job_ctx(db, clean_redis)))["queue_wait_notifications"]["ok"]
    await client.purge_queue(clean_redis, OPERATOR, "notifications")
    assert job.task_id and await jobstore.oldest_waiting_ms(clean_redis, "notifications") is None


async def test_the_oldest_waiting_job_counts_across_priorities_and_due_deferred_jobs(clean_redis: Redis) -> None:
    queue = "health-test"
    first = await enqueue_job(clean_redis, "noop", queue, priority=1)
    await enqueue_job(clean_redis, "noop", queue, priority=9)
    await enqueue_job(clean_redis, "noop", queue, defer_ms=60_000)  # not due: not waiting
    oldest = await jobstore.oldest_waiting_ms(clean_redis, queue)
    raw = await clean_redis.get(jobstore.job_key(first))
    assert (
        raw is not None and oldest == jobstore.decode_payload(first, jobstore.deserialize_json(raw), queue).enqueued_ms
    )
    due_since = jobstore.now_ms() - 120_000  # a deferred job due two minutes ago that no worker took in yet
    await clean_redis.zadd(jobstore.queue_name(queue), {"late": due_since})
    assert await jobstore.oldest_waiting_ms(clean_redis, queue) == due_since


async def test_connections_and_redis_memory_past_their_bounds_are_red(db: asyncpg.Pool, clean_redis: Redis) -> None:
    settings = get_settings()
    assert not connections_check(ServerStatus(81, 100, 0, 0.0), 0.8).ok
    assert connections_check(ServerStatus(80, 100, 0, 0.0), 0.8).ok
    assert not memory_check({"used_memory": 95, "maxmemory": 100, "total_system_memory": 10_000}, settings).ok
    assert memory_check({"used_memory": 95, "maxmemory": 0, "total_system_memory": 10_000}, settings).ok
    checks = checks_of(await check_system_health(job_ctx(db, clean_redis, health_connections_max_ratio=0.0001)))
    assert not checks["postgres_connections"]["ok"] and checks["postgres_connections"]["values"]["in_use"] >= 1
    assert checks["redis_reachable"]["ok"] and checks["redis_memory"]["values"]["used_bytes"] > 0


async def test_postgres_unreachable_fails_its_checks_and_is_still_reported(clean_redis: Redis) -> None:
    nowhere = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/postgres", min_size=0, max_size=1)
    try:
        result = await check_system_health(job_ctx(nowhere, clean_redis))
    finally:
        await nowhere.close()
    checks = checks_of(result)
    assert not checks["postgres_reachable"]["ok"] and "did not answer" in checks["postgres_reachable"]["detail"]
    assert not checks["rollups_daily_fresh"]["ok"] and checks["redis_reachable"]["ok"]
    assert result["notifications_recorded"] == 0 and result["notification_error"]
    stored = await last_report(clean_redis)
    assert stored is not None and "postgres_reachable" in stored.failing


async def test_the_check_runs_in_a_maintenance_worker(db: asyncpg.Pool, clean_redis: Redis) -> None:
    job = await client.enqueue_task(clean_redis, OPERATOR, "check_system_health")
    burst = arq_burst("maintenance")
    assert burst.returncode == 0, burst.stderr
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete", status
    assert checks_of(status.result)["queue_workers_maintenance"]["ok"]  # the worker running it is alive
    assert checks_of(status.result)["postgres_reachable"]["ok"] and status.result["checked_at"]
    assert datetime.fromisoformat(status.result["checked_at"]) > datetime.now(UTC) - timedelta(minutes=5)
