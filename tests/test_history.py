"""The job-history domain: records flow from Redis into `job_runs` in batches, and `prune_job_history` (an
admin task on the maintenance queue) deletes exactly the old ones."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import arq_burst
from worker import client, jobstore
from worker.history import flush_history
from worker.records import JobRecord


async def test_history_is_batched_and_pruned(clean_redis: Redis, db: asyncpg.Pool) -> None:
    now = jobstore.now_ms()
    records = [
        JobRecord(f"hist-{i}", "noop", "platform", "complete", [], {}, now, now, 1, 5, started_ms=now)
        for i in range(2500)
    ]
    await clean_redis.lpush(jobstore.HISTORY_KEY, *[jobstore.history_entry(r) for r in records])  # type: ignore[misc]
    assert await flush_history(clean_redis, db, "test") == 2500
    assert await clean_redis.llen(jobstore.HISTORY_KEY) == 0  # type: ignore[misc]
    assert await db.fetchval("SELECT count(*) FROM job_runs WHERE job_id LIKE 'hist-%'") == 2500
    await db.execute("UPDATE job_runs SET finished_at = now() - interval '90 days' WHERE job_id LIKE 'hist-1%'")
    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history")
    assert arq_burst("maintenance").returncode == 0
    result = (await client.job_status(clean_redis, db, job.task_id)).result
    assert result["deleted"] == 1111  # hist-1, hist-10..19, hist-100..199, hist-1000..1999
    assert await db.fetchval("SELECT count(*) FROM job_runs WHERE job_id LIKE 'hist-%'") == 2500 - 1111


async def test_maintenance_job_is_not_consumed_by_the_analytics_worker(db: asyncpg.Pool, clean_redis: Redis) -> None:
    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history")
    run = arq_burst("analytics")
    assert run.returncode == 0, run.stderr
    assert (await jobstore.queue_counts(clean_redis, "maintenance"))["queued"] == 1
    assert (await client.job_status(clean_redis, db, job.task_id)).status == "queued"

    assert arq_burst("maintenance").returncode == 0
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete" and status.queue == "maintenance"
