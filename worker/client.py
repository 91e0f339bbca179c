"""The job service the API and the CLI share: enqueue by name, status, listing, abort, retry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.jobs import get_job_run, list_job_runs
from worker import jobstore as js
from worker.registry import Queue, TaskArgumentError, TaskSpec, get_task

MAX_DEFER_SECONDS = 30 * 24 * 3600
WORKERS_KEY = js.WORKERS_KEY
WORKER_ALIVE_MS = 15_000


@dataclass(frozen=True)
class Enqueued:
    task_id: str
    task_name: str
    queue: str
    priority: int


class JobNotFoundError(LookupError):
    def __str__(self) -> str:
        return f"no job with id {self.args[0]!r}"


class JobStateError(ValueError):
    """The job exists but is not in a state the operation applies to."""


def prepare(task_name: str, args: list[Any] | None, kwargs: dict[str, Any] | None, priority: int | None,
            defer_seconds: float | None) -> tuple[TaskSpec, dict[str, Any], int, int]:
    """Validate everything before touching Redis; raises UnknownTaskError or TaskArgumentError (a ValueError)."""
    spec = get_task(task_name)
    if args is not None and not isinstance(args, list):
        raise TaskArgumentError("args must be a JSON array")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TaskArgumentError("kwargs must be a JSON object")
    bound = spec.validate(list(args or []), dict(kwargs or {}))
    prio = js.validate_priority(js.PRIORITY_DEFAULT if priority is None else priority)
    defer = defer_seconds or 0
    if not 0 <= defer <= MAX_DEFER_SECONDS:
        raise TaskArgumentError(f"defer_seconds must be between 0 and {MAX_DEFER_SECONDS}, got {defer}")
    return spec, bound, prio, int(defer * 1000)


async def enqueue_task(redis: Redis, task_name: str, args: list[Any] | None = None,
                       kwargs: dict[str, Any] | None = None, priority: int | None = None,
                       defer_seconds: float | None = None, *, retry_of: str | None = None,
                       notify_done: bool = False) -> Enqueued:
    spec, bound, prio, defer_ms = prepare(task_name, args, kwargs, priority, defer_seconds)
    job = await js.enqueue_raw(redis, task_name=spec.name, queue=spec.queue.value, kwargs=bound, priority=prio,
                               defer_ms=defer_ms, retry_of=retry_of, notify_done=notify_done)
    assert job is not None  # fresh random ids never collide
    return Enqueued(job.job_id, spec.name, spec.queue.value, prio)


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": row["job_id"], "task_name": row["task_name"], "queue": row["queue"], "status": row["status"],
        "result": row["result"], "error": row["error"], "traceback": row["traceback"],
        "enqueued_at": row["enqueued_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "tries": row["tries"], "priority": row["priority"], "progress": None, "worker_id": row["worker_id"],
    }


async def job_status(redis: Redis, db: asyncpg.Pool, job_id: str) -> dict[str, Any]:
    """Redis while the job is live (or its result is kept), PostgreSQL job_runs after."""
    live = await js.live_status(redis, job_id)
    if live is not None:
        return live
    row = await get_job_run(db, job_id)
    if row is None:
        raise JobNotFoundError(job_id)
    return _from_row(row)


async def list_jobs(redis: Redis, db: asyncpg.Pool, *, queue: str | None = None, status: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:
    if queue is not None and queue not in {q.value for q in Queue}:
        raise ValueError(f"unknown queue {queue!r}; queues: {', '.join(q.value for q in Queue)}")
    if status is not None and status not in js.STATUSES:
        raise ValueError(f"unknown status {status!r}; statuses: {', '.join(js.STATUSES)}")
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be between 1 and 1000, got {limit}")
    jobs: dict[str, dict[str, Any]] = {}
    if status in (None, "queued", "deferred", "in_progress"):
        for q in [queue] if queue else [q.value for q in Queue]:
            for job in await js.live_jobs(redis, q, limit):
                if status is None or job["status"] == status:
                    jobs[job["task_id"]] = job
    for row in await list_job_runs(db, queue=queue, status=status, limit=limit):
        jobs.setdefault(row["job_id"], _from_row(row))
    newest = sorted(jobs.values(), key=lambda j: j["enqueued_at"] or 0, reverse=True)
    return newest[:limit]


async def abort_job(redis: Redis, db: asyncpg.Pool, job_id: str) -> str:
    """Abort a queued, deferred or running job; returns the status it had."""
    previous = await js.abort(redis, job_id)
    if previous is not None:
        return previous
    status = await job_status(redis, db, job_id)  # raises JobNotFoundError for unknown ids
    raise JobStateError(f"job {job_id} is already {status['status']}; only queued or running jobs can be aborted")


async def retry_job(redis: Redis, db: asyncpg.Pool, job_id: str) -> Enqueued:
    """Run a failed (or aborted) job again as a new job with the same task and arguments."""
    status = await job_status(redis, db, job_id)
    if status["status"] not in ("failed", "aborted"):
        raise JobStateError(f"job {job_id} is {status['status']}; only failed or aborted jobs can be retried")
    kwargs = await _job_kwargs(redis, db, job_id)
    return await enqueue_task(redis, status["task_name"], kwargs=kwargs, priority=status["priority"],
                              retry_of=job_id)


async def _job_kwargs(redis: Redis, db: asyncpg.Pool, job_id: str) -> dict[str, Any]:
    raw = await redis.get(js.result_key(job_id))
    if raw:
        return dict(json.loads(raw).get("kwargs") or {})
    row = await get_job_run(db, job_id)
    return dict(row["kwargs"]) if row else {}


async def workers(redis: Redis) -> list[dict[str, Any]]:
    """Workers that reported within the liveness window, with what they run."""
    alive_since = js.now_ms() - WORKER_ALIVE_MS
    ids = await redis.zrangebyscore(WORKERS_KEY, alive_since, "+inf")
    found = []
    for worker_id in ids:
        info = await redis.hgetall(f"{WORKERS_KEY}:{worker_id.decode()}")  # type: ignore[misc]
        if info:
            found.append({k.decode(): v.decode() for k, v in info.items()})
    return found


async def workers_by_queue(redis: Redis) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in await workers(redis):
        counts[info["queue"]] = counts.get(info["queue"], 0) + 1
    return counts


async def queue_overview(redis: Redis) -> dict[str, dict[str, int]]:
    """Per queue: queued, deferred, in progress, and workers alive (`/queues`, `/dashboard`, `/metrics`,
    `inspect queues`)."""
    alive = await workers_by_queue(redis)
    return {q.value: {**await js.queue_counts(redis, q.value), "workers": alive.get(q.value, 0)} for q in Queue}
