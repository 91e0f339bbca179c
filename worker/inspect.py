"""`salesdash inspect …`: what Celery's `inspect` showed, read from Redis and job_runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
from arq.cron import next_cron
from redis.asyncio import Redis

from db.queries.history import job_run_counts
from salesdash.config import get_settings
from worker import client
from worker.records import JobStatus
from worker.registry import TASKS, TaskSpec

Rows = tuple[list[dict[str, Any]], list[str]]


async def _live(redis: Redis, db: asyncpg.Pool, states: tuple[str, ...]) -> list[JobStatus]:
    jobs = []
    for state in states:
        jobs += await client.list_jobs(redis, db, status=state, limit=1000)
    return jobs


async def active(db: asyncpg.Pool, redis: Redis) -> Rows:
    rows = [j.model_dump() for j in await _live(redis, db, ("in_progress",))]
    return rows, ["task_id", "task_name", "queue", "worker_id", "started_at", "tries", "progress"]


async def scheduled(db: asyncpg.Pool, redis: Redis) -> Rows:
    rows = [j.model_dump() for j in await _live(redis, db, ("queued", "deferred"))]
    return rows, ["task_id", "task_name", "queue", "status", "priority", "enqueued_at"]


async def registered(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows: list[dict[str, Any]] = [
        {"worker_id": w.worker_id, "queue": w.queue, "task": name}
        for w in await client.workers(redis)
        for name in w.functions
    ]
    if not rows:  # no worker alive: show what the task table declares
        rows = [{"worker_id": None, "queue": s.queue.value, "task": s.name} for s in TASKS.values()]
    return rows, ["worker_id", "queue", "task"]


async def stats(db: asyncpg.Pool, redis: Redis) -> Rows:
    rows: list[dict[str, Any]] = [
        {
            "worker_id": w.worker_id,
            "queue": w.queue,
            "pid": w.pid,
            "host": w.host,
            "complete": w.jobs_complete,
            "failed": w.jobs_failed,
            "retried": w.jobs_retried,
            "running": len(w.running),
        }
        for w in await client.workers(redis)
    ]
    for row in await job_run_counts(db):
        rows.append(
            {
                "worker_id": "(history)",
                "queue": row["queue"],
                "task": row["task_name"],
                "status": row["status"],
                "count": row["n"],
            }
        )
    return rows, ["worker_id", "queue", "pid", "complete", "failed", "retried", "running", "task", "status", "count"]


async def queues(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows = [{"queue": name, **counts} for name, counts in (await client.queue_overview(redis)).items()]
    return rows, ["queue", "queued", "deferred", "in_progress", "workers"]


def next_run(spec: TaskSpec, now: datetime) -> datetime | None:
    """When a scheduled task is next enqueued (arq's cron arithmetic, in the store's timezone); None on demand."""
    s = spec.schedule
    if s is None:
        return None
    weekday: Any = s.weekday
    return next_cron(now, minute=s.minute, hour=s.hour, day=s.day, weekday=weekday)


async def tasks(_: asyncpg.Pool, __: Redis) -> Rows:
    """The task table as the workers apply it: schedule and next run (what Celery beat held), time limit,
    tries and retry backoff, result expiry."""
    now = datetime.now(get_settings().tzinfo)
    rows: list[dict[str, Any]] = [
        {
            "task": spec.name,
            "queue": spec.queue.value,
            "scope": spec.scope.value,
            "schedule": spec.schedule.text if spec.schedule else "on demand",
            "next_run": next_run(spec, now),
            "time_limit_s": spec.timeout_s,
            "max_tries": spec.retry.max_tries,
            "retry_backoff_s": f"{spec.retry.backoff_base_s:g}·2^n ≤ {spec.retry.backoff_cap_s:g}",
            "keep_result_s": spec.keep_result_s,
        }
        for spec in TASKS.values()
    ]
    return rows, list(rows[0])


INSPECTORS: dict[str, Callable[[asyncpg.Pool, Redis], Awaitable[Rows]]] = {
    "active": active,
    "scheduled": scheduled,
    "registered": registered,
    "stats": stats,
    "queues": queues,
    "tasks": tasks,
}
