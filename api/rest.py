"""REST routes (docs/rest.md): thin, they authenticate, parse, call worker.client with the principal, and shape
the answer. Scope refusals raised by the service (salesdash.auth.AuthError) become 401/403 in api.main."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response
from pydantic import BaseModel, Field

from api.deps import DbDep, PrincipalDep, ReadDep, RedisDep
from worker import client
from worker.records import PRIORITY_DEFAULT, JobState, JobStatus, TaskInfo
from worker.registry import UnknownTaskError

router = APIRouter()


class JobRequest(BaseModel):  # type: ignore[no-redef]  # the pydantic plugin trips on a field named kwargs
    task_name: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    priority: int = PRIORITY_DEFAULT
    defer_seconds: float = 0


class JobAccepted(BaseModel):
    task_id: str
    task_name: str
    queue: str
    priority: int
    status: JobState


class JobAborted(BaseModel):
    task_id: str
    aborted: bool
    previous_status: str


class JobRetried(BaseModel):
    task_id: str
    retry_of: str
    task_name: str
    queue: str


class QueuePurged(BaseModel):
    queue: str
    removed: int


class QueueCounts(BaseModel):
    queued: int
    deferred: int
    in_progress: int
    workers: int


def trigger_refusal(exc: client.RateLimitedError | client.IdempotencyConflictError) -> HTTPException:
    """429 with Retry-After, or 409: the answers of a trigger the job service refused for its token."""
    if isinstance(exc, client.RateLimitedError):
        return HTTPException(429, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    return HTTPException(409, detail=str(exc))


@router.post("/jobs", status_code=202)
async def create_job(
    body: JobRequest,
    redis: RedisDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Repeat-safe trigger key, per token (docs/rest.md#post-jobs).",
            min_length=1,
            max_length=client.IDEMPOTENCY_KEY_MAX,
            pattern=r"^[\x20-\x7e]+$",
        ),
    ] = None,
) -> JobAccepted:
    try:
        job = await client.enqueue_task(
            redis,
            principal,
            body.task_name,
            body.args,
            body.kwargs,
            body.priority,
            body.defer_seconds,
            idempotency_key=idempotency_key,
        )
    except (UnknownTaskError, ValueError) as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except (client.RateLimitedError, client.IdempotencyConflictError) as exc:
        raise trigger_refusal(exc) from None
    if job.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobAccepted(
        task_id=job.task_id,
        task_name=job.task_name,
        queue=job.queue,
        priority=job.priority,
        status="deferred" if job.deferred else "queued",
    )


@router.get("/jobs")
async def list_jobs(
    redis: RedisDep, db: DbDep, _: ReadDep, queue: str | None = None, status: str | None = None, limit: int = Query(50)
) -> list[JobStatus]:
    try:
        jobs = await client.list_jobs(redis, db, queue=queue, status=status, limit=limit)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return jobs


@router.get("/jobs/{task_id}")
async def get_job(task_id: str, redis: RedisDep, db: DbDep, _: ReadDep) -> JobStatus:
    try:
        return await client.job_status(redis, db, task_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None


@router.delete("/jobs/{task_id}")
async def abort_job(task_id: str, redis: RedisDep, db: DbDep, principal: PrincipalDep) -> JobAborted:
    try:
        previous = await client.abort_job(redis, db, principal, task_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return JobAborted(task_id=task_id, aborted=True, previous_status=previous)


@router.post("/jobs/{task_id}/retry", status_code=202)
async def retry_job(task_id: str, redis: RedisDep, db: DbDep, principal: PrincipalDep) -> JobRetried:
    try:
        job = await client.retry_job(redis, db, principal, task_id)
    except (client.RateLimitedError, client.IdempotencyConflictError) as exc:
        raise trigger_refusal(exc) from None
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except (UnknownTaskError, ValueError) as exc:  # the job's task left the registry, or its arguments no longer fit
        raise HTTPException(422, detail=str(exc)) from None
    return JobRetried(task_id=job.task_id, retry_of=task_id, task_name=job.task_name, queue=job.queue)


@router.post("/queues/{queue}/purge")
async def purge_queue(queue: str, redis: RedisDep, principal: PrincipalDep) -> QueuePurged:
    try:
        removed = await client.purge_queue(redis, principal, queue)
    except ValueError as exc:  # the only ValueError is an unknown queue, a resource in the path
        raise HTTPException(404, detail=str(exc)) from None
    return QueuePurged(queue=queue, removed=removed)


@router.get("/queues")
async def queues(redis: RedisDep, _: ReadDep) -> dict[str, QueueCounts]:
    return {name: QueueCounts(**counts) for name, counts in (await client.queue_overview(redis)).items()}


@router.get("/tasks")
async def tasks(_: ReadDep) -> list[TaskInfo]:
    return client.task_table()
