"""The job service the API and the CLI share: enqueue by name, status, listing, abort, retry, purge.

Every operation that changes a job checks the caller's scope here, once, whichever transport it came by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.history import get_job_run, list_job_runs
from salesdash.auth import Principal, Scope, require, scope_to_operate
from salesdash.config import get_settings
from worker import jobstore as js
from worker.records import (
    JOB_STATES,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    JobPayload,
    JobStatus,
    TaskInfo,
    WorkerInfo,
)
from worker.registry import TASKS, Queue, TaskArgumentError, TaskSpec, get_task

MAX_DEFER_SECONDS = 30 * 24 * 3600
NotReplicatedError = js.NotReplicatedError  # enqueue_task: stored, but no replica acknowledged it in time
QUEUES = tuple(q.value for q in Queue)


@dataclass(frozen=True)
class Enqueued:
    task_id: str
    task_name: str
    queue: str
    priority: int
    deferred: bool


class JobNotFoundError(LookupError):
    def __str__(self) -> str:
        return f"no job with id {self.args[0]!r}"


class JobStateError(ValueError):
    """The job exists but is not in a state the operation applies to."""


def validate_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise TaskArgumentError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}")
    return priority


def prepare(
    task_name: str,
    args: list[Any] | None,
    kwargs: dict[str, Any] | None,
    priority: int | None,
    defer_seconds: float | None,
) -> tuple[TaskSpec, dict[str, Any], int, int]:
    """Validate everything before touching Redis; raises UnknownTaskError or TaskArgumentError (a ValueError)."""
    spec = get_task(task_name)
    if args is not None and not isinstance(args, list):
        raise TaskArgumentError("args must be a JSON array")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TaskArgumentError("kwargs must be a JSON object")
    bound = spec.validate(list(args or []), dict(kwargs or {}))
    prio = validate_priority(PRIORITY_DEFAULT if priority is None else priority)
    defer = defer_seconds or 0
    if not 0 <= defer <= MAX_DEFER_SECONDS:
        raise TaskArgumentError(f"defer_seconds must be between 0 and {MAX_DEFER_SECONDS}, got {defer}")
    return spec, bound, prio, int(defer * 1000)


async def enqueue_task(
    redis: Redis,
    principal: Principal,
    task_name: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    priority: int | None = None,
    defer_seconds: float | None = None,
    *,
    retry_of: str | None = None,
    notify_done: bool = False,
) -> Enqueued:
    # a read principal is refused before it learns which task names exist; a known task's own scope is checked
    # before its arguments are, so the caller learns nothing more about a task it may not run
    require(principal, Scope.TRIGGER)
    require(principal, scope_to_operate(get_task(task_name).scope))
    spec, bound, prio, defer_ms = prepare(task_name, args, kwargs, priority, defer_seconds)
    now = js.now_ms()
    job = JobPayload(
        js.new_job_id(),
        spec.name,
        [],
        bound,
        spec.queue.value,
        prio,
        now,
        now + defer_ms,
        retry_of=retry_of,
        notify=notify_done,
    )
    if not await js.enqueue(redis, job, replica_wait_ms=get_settings().enqueue_replica_wait_ms):
        raise RuntimeError(f"job id {job.id} is taken")  # fresh random ids never collide
    return Enqueued(job.id, spec.name, spec.queue.value, prio, deferred=defer_ms > 0)


def _from_row(row: dict[str, Any]) -> JobStatus:
    return JobStatus(
        task_id=row["job_id"],
        task_name=row["task_name"],
        queue=row["queue"],
        status=row["status"],
        result=row["result"],
        error=row["error"],
        traceback=row["traceback"],
        enqueued_at=row["enqueued_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        tries=row["tries"],
        priority=row["priority"],
        worker_id=row["worker_id"],
    )


async def job_status(redis: Redis, db: asyncpg.Pool, job_id: str) -> JobStatus:
    """Redis while the job is live (or its result is kept), PostgreSQL job_runs after."""
    live = await js.live_status(redis, job_id, QUEUES)
    if live is not None:
        return live
    row = await get_job_run(db, job_id)
    if row is None:
        raise JobNotFoundError(job_id)
    return _from_row(row)


async def list_jobs(
    redis: Redis, db: asyncpg.Pool, *, queue: str | None = None, status: str | None = None, limit: int = 50
) -> list[JobStatus]:
    if queue is not None and queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues: {', '.join(QUEUES)}")
    if status is not None and status not in JOB_STATES:
        raise ValueError(f"unknown status {status!r}; statuses: {', '.join(JOB_STATES)}")
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be between 1 and 1000, got {limit}")
    jobs: dict[str, JobStatus] = {}
    if status in (None, "queued", "deferred", "in_progress"):
        for q in [queue] if queue else QUEUES:
            for job_id in await js.live_ids(redis, q, limit):
                job = await js.live_status(redis, job_id, QUEUES)
                if job is not None and (status is None or job.status == status):
                    jobs[job.task_id] = job
    for row in await list_job_runs(db, queue=queue, status=status, limit=limit):
        jobs.setdefault(row["job_id"], _from_row(row))
    newest = sorted(jobs.values(), key=lambda j: j.enqueued_at.timestamp() if j.enqueued_at else 0, reverse=True)
    return newest[:limit]


async def _authorize_for_job(redis: Redis, db: asyncpg.Pool, principal: Principal, job_id: str) -> JobStatus:
    """The job's status, once the principal may operate on its task (checked before anything is revealed
    beyond the id's existence)."""
    require(principal, Scope.TRIGGER)  # read can change nothing: refuse before telling whether the id exists
    status = await job_status(redis, db, job_id)  # JobNotFoundError for unknown ids
    spec = TASKS.get(status.task_name)
    require(principal, scope_to_operate(spec.scope if spec else None))
    return status


async def abort_job(redis: Redis, db: asyncpg.Pool, principal: Principal, job_id: str) -> str:
    """Abort a queued, deferred or running job; returns the status it had. Needs the scope of the job's task."""
    status = await _authorize_for_job(redis, db, principal, job_id)
    live = await js.read_live_job(redis, job_id, QUEUES)
    if live is not None:
        now = js.now_ms()
        job = live.payload or JobPayload(job_id, status.task_name, [], {}, live.queue, status.priority, now, now)
        record = js.job_record(job, "aborted", tries=job.tries, error="aborted before it started")
        spec = TASKS.get(job.task)
        keep_ms = int((spec.keep_result_s if spec else 24 * 3600) * 1000)
        previous = await js.abort(redis, record, notify=job.notify, keep_result_ms=keep_ms)
        if previous is not None:
            return previous
        status = await job_status(redis, db, job_id)  # it finished meanwhile
    raise JobStateError(f"job {job_id} is already {status.status}; only queued or running jobs can be aborted")


async def retry_job(redis: Redis, db: asyncpg.Pool, principal: Principal, job_id: str) -> Enqueued:
    """Run a failed (or aborted) job again as a new job with the same task and arguments. Needs the scope of the
    job's task, checked before its state so a refused caller learns only that it may not touch the job."""
    status = await _authorize_for_job(redis, db, principal, job_id)
    if status.status not in ("failed", "aborted"):
        raise JobStateError(f"job {job_id} is {status.status}; only failed or aborted jobs can be retried")
    args, kwargs = await _job_arguments(redis, db, job_id)
    return await enqueue_task(redis, principal, status.task_name, args, kwargs, status.priority, retry_of=job_id)


async def _job_arguments(redis: Redis, db: asyncpg.Pool, job_id: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        record = await js.read_record(redis, job_id)
    except js.BadPayload:
        record = None
    if record is not None:
        return record.args, record.kwargs
    row = await get_job_run(db, job_id)
    return (list(row["args"] or []), dict(row["kwargs"] or {})) if row else ([], {})


async def purge_queue(redis: Redis, principal: Principal, queue: str) -> int:
    """Drop every waiting job of a queue; returns how many. Admin only: it deletes jobs of every task at once."""
    require(principal, Scope.ADMIN)
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues: {', '.join(QUEUES)}")
    return await js.purge(redis, queue)


def task_table() -> list[TaskInfo]:
    return [
        TaskInfo(
            name=s.name,
            queue=s.queue.value,
            schedule=s.schedule.text if s.schedule else "on demand",
            description=s.description,
            scope=s.scope.value,
        )
        for s in TASKS.values()
    ]


async def workers(redis: Redis) -> list[WorkerInfo]:
    """Workers that reported within the liveness window, with what they run."""
    return await js.live_workers(redis)


async def queue_overview(redis: Redis) -> dict[str, dict[str, int]]:
    """Per queue: queued, deferred, in progress, and workers alive (`/queues`, `/dashboard`, `/metrics`,
    `inspect queues`)."""
    alive: dict[str, int] = {}
    for info in await workers(redis):
        alive[info.queue] = alive.get(info.queue, 0) + 1
    return {q: {**await js.queue_counts(redis, q), "workers": alive.get(q, 0)} for q in QUEUES}
