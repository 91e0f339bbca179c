"""`salesdash inspect …`: what Celery's `inspect` showed, read from Redis and job_runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.jobs import job_run_counts
from worker import client, jobstore
from worker.registry import TASKS, Queue

Rows = tuple[list[dict[str, Any]], list[str]]


async def active(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows = []
    for queue in Queue:
        for job in await jobstore.live_jobs(redis, queue.value, 1000):
            if job["status"] == "in_progress":
                rows.append(job)
    return rows, ["task_id", "task_name", "queue", "worker_id", "started_at", "tries", "progress"]


async def scheduled(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows = []
    for queue in Queue:
        for job in await jobstore.live_jobs(redis, queue.value, 1000):
            if job["status"] in ("queued", "deferred"):
                rows.append(job)
    return rows, ["task_id", "task_name", "queue", "status", "priority", "enqueued_at"]


async def registered(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows = []
    for worker in await client.workers(redis):
        for name in json.loads(worker["functions"]):
            rows.append({"worker_id": worker["worker_id"], "queue": worker["queue"], "task": name})
    if not rows:  # no worker alive: show what the registry declares
        rows = [{"worker_id": None, "queue": s.queue.value, "task": s.name} for s in TASKS.values()]
    return rows, ["worker_id", "queue", "task"]


async def stats(db: asyncpg.Pool, redis: Redis) -> Rows:
    workers = await client.workers(redis)
    rows: list[dict[str, Any]] = [
        {"worker_id": w["worker_id"], "queue": w["queue"], "pid": w["pid"], "host": w["host"],
         "complete": w["jobs_complete"], "failed": w["jobs_failed"], "retried": w["jobs_retried"],
         "running": len(json.loads(w["running"]))} for w in workers
    ]
    history = await job_run_counts(db)
    for row in history:
        rows.append({"worker_id": "(history)", "queue": row["queue"], "task": row["task_name"],
                     "status": row["status"], "count": row["n"]})
    return rows, ["worker_id", "queue", "pid", "complete", "failed", "retried", "running", "task", "status",
                  "count"]


async def queues(_: asyncpg.Pool, redis: Redis) -> Rows:
    rows = [{"queue": name, **counts} for name, counts in (await client.queue_overview(redis)).items()]
    return rows, ["queue", "queued", "deferred", "in_progress", "workers"]


INSPECTORS: dict[str, Callable[[asyncpg.Pool, Redis], Awaitable[Rows]]] = {
    "active": active, "scheduled": scheduled, "registered": registered, "stats": stats, "queues": queues,
}
