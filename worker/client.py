"""The job service the API and the CLI share: enqueue by name, status, listing, abort, retry, purge.

Every operation that changes a job checks the caller's scope here, once, whichever transport it came by.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.history import get_job_run, list_job_runs
from salesdash import tracing
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
MAX_JOB_ID_LENGTH = 128  # ours are 32 hex digits; an arq client's own ids stay well below this
NotReplicatedError = js.NotReplicatedError  # enqueue_task: stored, but no replica acknowledged it in time
QUEUES = tuple(q.value for q in Queue)


@dataclass(frozen=True)
class Enqueued:
    task_id: str
    task_name: str
    queue: str
    priority: int
    deferred: bool
    replayed: bool = False  # the job an earlier call with the same idempotency key created


class RateLimitedError(Exception):
    """The token triggered more than its rate allows; `retry_after_s` is when the next trigger will be let in."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many triggers with this token; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class IdempotencyConflictError(Exception):
    """The idempotency key was used, within its window, for a trigger with other arguments."""

    def __str__(self) -> str:
        return "this Idempotency-Key was already used with different arguments"


IDEMPOTENCY_KEY_MAX = 255


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
    idempotency_key: str | None = None,
) -> Enqueued:
    """Validate, then enqueue in one Redis round trip. A token's triggers are rate limited (RateLimitedError);
    with an idempotency key, a repeat within the window returns the first call's job (IdempotencyConflictError
    when its arguments differ). The operator (CLI) has no rate limit."""
    # a read principal is refused before it learns which task names exist; a known task's own scope is checked
    # before its arguments are, so the caller learns nothing more about a task it may not run
    require(principal, Scope.TRIGGER)
    require(principal, scope_to_operate(get_task(task_name).scope))
    spec, bound, prio, defer_ms = prepare(task_name, args, kwargs, priority, defer_seconds)
    now = js.now_ms()
    with tracing.enqueue_span(spec.name, spec.queue.value):
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
            trace=tracing.carrier(),  # the job's run continues this trace
        )
        enqueued = Enqueued(job.id, spec.name, spec.queue.value, prio, deferred=defer_ms > 0)
        guard = _guard(principal, enqueued, bound, defer_ms, idempotency_key)
        done = await js.trigger(redis, job, guard, replica_wait_ms=get_settings().enqueue_replica_wait_ms)
    if done.outcome == "limited":
        raise RateLimitedError(max(1, math.ceil(done.retry_after_ms / 1000)))
    if done.outcome == "conflict":
        raise IdempotencyConflictError()
    if done.outcome == "replayed":
        return Enqueued(**{**json.loads(done.replay), "replayed": True})
    if done.outcome != "enqueued":
        raise RuntimeError(f"job id {job.id} is taken")  # fresh random ids never collide
    return enqueued


def _guard(
    principal: Principal, enqueued: Enqueued, bound: dict[str, Any], defer_ms: int, idempotency_key: str | None
) -> js.TriggerGuard:
    """The rate limit of the principal's token and its idempotency key, from the settings."""
    settings = get_settings()
    owner = principal.token_id
    rate = settings.trigger_rate_per_minute if owner is not None else 0
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX and idempotency_key.isprintable() and idempotency_key.isascii()
    ):
        raise ValueError(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    rate_key = js.trigger_rate_key(owner) if owner is not None and rate > 0 else None
    interval_ms = 60_000 / rate if rate > 0 else 0
    if idempotency_key is None:  # nothing to fingerprint or replay (two JSON encodings and a hash a trigger saves)
        return js.TriggerGuard(rate_key=rate_key, interval_ms=interval_ms, burst=settings.trigger_burst)
    request = [enqueued.task_name, bound, enqueued.priority, defer_ms]
    return js.TriggerGuard(
        rate_key=rate_key,
        interval_ms=interval_ms,
        burst=settings.trigger_burst,
        idempotency_key=js.idempotency_key("operator" if owner is None else str(owner), idempotency_key),
        fingerprint=hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest(),
        window_ms=settings.idempotency_window_s * 1000,
        replay=json.dumps({k: v for k, v in asdict(enqueued).items() if k != "replayed"}),
    )


def status_of_row(row: dict[str, Any]) -> JobStatus:
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


def possible_job_id(job_id: str) -> bool:
    """False for an id no job can have: empty, too long, or with characters PostgreSQL text cannot hold (NUL) or
    UTF-8 cannot encode (lone surrogates); such an id is simply not found."""
    if not 0 < len(job_id) <= MAX_JOB_ID_LENGTH or "\x00" in job_id:
        return False
    try:
        job_id.encode()
    except UnicodeEncodeError:
        return False
    return True


def shown_to(principal: Principal, job: JobStatus) -> JobStatus:
    """A job as this caller may see it: a traceback names the server's files and lines, so only admin sees it;
    every scope sees the error message."""
    if job.traceback is None or principal.allows(Scope.ADMIN):
        return job
    return job.model_copy(update={"traceback": None})


async def job_status(redis: Redis, db: asyncpg.Pool, job_id: str) -> JobStatus:
    """Redis while the job is live (or its result is kept), PostgreSQL job_runs after."""
    if not possible_job_id(job_id):
        raise JobNotFoundError(job_id)
    live = await js.live_status(redis, job_id, QUEUES)
    if live is not None:
        return live
    row = await get_job_run(db, job_id)
    if row is None:
        raise JobNotFoundError(job_id)
    return status_of_row(row)


async def list_jobs(
    redis: Redis, db: asyncpg.Pool, *, queue: str | None = None, status: str | None = None, limit: int = 50
) -> list[JobStatus]:
    if queue is not None and queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues: {', '.join(QUEUES)}")
    if status is not None and status not in JOB_STATES:
        raise ValueError(f"unknown status {status!r}; statuses: {', '.join(JOB_STATES)}")
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be between 1 and 1000, got {limit}")
    jobs = {job.task_id: job for job in await live_jobs(redis, queue=queue, status=status, limit=limit)}
    for row in await list_job_runs(db, queue=queue, status=status, limit=limit):
        jobs.setdefault(row["job_id"], status_of_row(row))
    newest = sorted(jobs.values(), key=lambda j: j.enqueued_at.timestamp() if j.enqueued_at else 0, reverse=True)
    return newest[:limit]


async def live_jobs(redis: Redis, *, queue: str | None, status: str | None, limit: int) -> list[JobStatus]:
    """Jobs Redis holds as waiting or running (none when `status` is a finished state), at most `limit` a queue."""
    jobs: list[JobStatus] = []
    if status in (None, "queued", "deferred", "in_progress"):
        for q in [queue] if queue else QUEUES:
            for job_id in await js.live_ids(redis, q, limit):
                job = await js.live_status(redis, job_id, QUEUES)
                if job is not None and (status is None or job.status == status):
                    jobs.append(job)
    return jobs


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
    args, kwargs = await job_arguments(redis, db, job_id)
    return await enqueue_task(redis, principal, status.task_name, args, kwargs, status.priority, retry_of=job_id)


async def job_arguments(redis: Redis, db: asyncpg.Pool, job_id: str) -> tuple[list[Any], dict[str, Any]]:
    """A job's arguments: from its kept record, its live payload, or job_runs; empty when none is readable."""
    try:
        record = await js.read_record(redis, job_id)
    except js.BadPayload:
        record = None
    if record is not None:
        return record.args, record.kwargs
    live = await js.read_live_job(redis, job_id, QUEUES)
    if live is not None and live.payload is not None:
        return live.payload.args, live.payload.kwargs
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


async def oldest_waits(redis: Redis) -> dict[str, float | None]:
    """Per queue: seconds the longest-waiting due job has waited; None when none waits (`/metrics`, `events`)."""
    now, waits = js.now_ms(), {}
    for q in QUEUES:
        since = await js.oldest_waiting_ms(redis, q)
        waits[q] = None if since is None else max(now - since, 0) / 1000
    return waits
