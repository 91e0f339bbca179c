"""The job-history domain: records flow from Redis into `job_runs` in batches, every try into `job_tries` in the same
statement, and `prune_job_history` (an admin task on the maintenance queue) deletes exactly the old ones, with their
tries."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.asyncio import Redis

from db.queries.history import job_tries
from salesdash.auth import OPERATOR
from tests.conftest import arq_burst, enqueue_job
from worker import client, jobstore
from worker import jobstore as js
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
    assert await db.fetchval("SELECT count(*) FROM job_tries WHERE job_id LIKE 'hist-%'") == 2500  # one try each
    await db.execute("UPDATE job_runs SET finished_at = now() - interval '90 days' WHERE job_id LIKE 'hist-1%'")
    await db.execute(  # an old try whose run never got recorded goes too; a recent one stays
        """INSERT INTO job_tries (job_id, try_no, outcome, finished_at)
           VALUES ('hist-orphan-old', 1, 'lost', now() - interval '90 days'), ('hist-orphan-new', 1, 'lost', now())"""
    )
    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history")
    assert arq_burst("maintenance").returncode == 0
    result = (await client.job_status(clean_redis, db, job.task_id)).result
    assert result["deleted"] == 1111  # hist-1, hist-10..19, hist-100..199, hist-1000..1999
    assert await db.fetchval("SELECT count(*) FROM job_runs WHERE job_id LIKE 'hist-%'") == 2500 - 1111
    kept = await db.fetch("SELECT job_id FROM job_tries WHERE job_id LIKE 'hist-%'")
    runs = await db.fetch("SELECT job_id FROM job_runs WHERE job_id LIKE 'hist-%'")
    assert {r["job_id"] for r in kept} == {r["job_id"] for r in runs} | {"hist-orphan-new"}  # tries went with runs


async def test_maintenance_job_is_not_consumed_by_the_analytics_worker(db: asyncpg.Pool, clean_redis: Redis) -> None:
    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history")
    run = arq_burst("analytics")
    assert run.returncode == 0, run.stderr
    assert (await jobstore.queue_counts(clean_redis, "maintenance"))["queued"] == 1
    assert (await client.job_status(clean_redis, db, job.task_id)).status == "queued"

    assert arq_burst("maintenance").returncode == 0
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete" and status.queue == "maintenance"


async def test_every_try_is_kept_with_its_worker_and_outcome(clean_redis: Redis, db: asyncpg.Pool) -> None:
    """At the wire format: a try lost with a dead worker (the sweep writes it), a wait for a dependency, a retried
    failure, a late fenced write and the completing try all reach job_tries in one flush, each once."""
    keys = js.QueueKeys("tries")
    job_id = await enqueue_job(clean_redis, "noop", "tries")
    [lost], _ = await js.claim(clean_redis, keys, 1, "host-a:1:aaaaaa", lease_ms=1)
    await asyncio.sleep(0.01)
    assert await js.sweep(clean_redis, keys) == [job_id]  # host a died mid-try
    job = js.decode_payload(job_id, js.deserialize_json(lost.raw or b""), "tries")

    async def run_try(worker: str, kind: str, status: str, n: int, error: str | None = None) -> js.Claimed:
        await asyncio.sleep(0.003)  # tries end in distinct milliseconds: the order below is theirs
        [claimed], _ = await js.claim(clean_redis, keys, 1, worker, first_lease=n)
        record = js.job_record(job, status, tries=n, started_ms=js.now_ms() - 5, worker_id=worker, error=error)
        outcome = js.Outcome(job, kind, record, keep_result_ms=60_000, retry_at_ms=js.now_ms(), lease=claimed.lease)
        assert await js.finish(clean_redis, keys, [outcome], js.serialize_json) == []
        return claimed

    await run_try("host-b:2:bbbbbb", "wait", "deferred", 2, error="waiting for PostgreSQL: OSError: refused")
    await run_try("host-b:2:bbbbbb", "retry", "deferred", 2, error="ValueError: <b>bad</b>")
    await run_try("host-c:3:cccccc", "final", "complete", 3)
    await asyncio.sleep(0.003)
    late = js.job_record(job, "complete", tries=1, started_ms=js.now_ms() - 9, worker_id="host-a:1:aaaaaa")
    fenced = js.Outcome(job, "final", late, keep_result_ms=60_000, lease=lost.lease)
    assert await js.finish(clean_redis, keys, [fenced], js.serialize_json) == [fenced]

    pending = await clean_redis.lrange(js.HISTORY_KEY, 0, -1)  # type: ignore[misc]
    assert await flush_history(clean_redis, db, "test") == 5
    await clean_redis.lpush(js.HISTORY_KEY, *reversed(pending))  # type: ignore[misc]  # a flush redone after a crash
    assert await flush_history(clean_redis, db, "test") == 5
    tries = await job_tries(db, job_id)
    assert [(t["try_no"], t["outcome"], t["worker_id"], t["host"]) for t in tries] == [
        (1, "lost", "host-a:1:aaaaaa", "host-a"),
        (2, "waiting", "host-b:2:bbbbbb", "host-b"),
        (2, "retried", "host-b:2:bbbbbb", "host-b"),
        (3, "complete", "host-c:3:cccccc", "host-c"),
        (1, "fenced", "host-a:1:aaaaaa", "host-a"),
    ]
    assert tries[0]["started_at"] is not None and tries[0]["started_at"] <= tries[0]["finished_at"]
    assert "lost" in tries[0]["error"] and tries[1]["error"] == "waiting for PostgreSQL: OSError: refused"
    assert tries[2]["error"] == "ValueError: <b>bad</b>" and tries[3]["error"] is None
    assert all(t["duration_ms"] is not None and t["duration_ms"] >= 5 for t in tries[1:])
    run = await db.fetchrow("SELECT status, tries, worker_id FROM job_runs WHERE job_id = $1", job_id)
    assert dict(run) == {"status": "complete", "tries": 3, "worker_id": "host-c:3:cccccc"}  # not the fenced write
