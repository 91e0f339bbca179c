"""REST routes (docs/rest.md): thin, they authenticate, parse, call worker.client with the principal, and shape
the answer. Scope refusals raised by the service (salesdash.auth.AuthError) become 401/403 in api.errors; every
status a route can answer is declared with it, so the OpenAPI document is the contract (docs/rest.md#errors)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DbDep, PrincipalDep, ReadDep, RedisDep
from api.errors import error_responses
from worker import client
from worker.records import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, JobState, JobStatus, TaskInfo
from worker.registry import Queue, UnknownTaskError

router = APIRouter()

# a job id as the path carries it: printable ASCII (no NUL, no spaces), as ours and arq clients' ids are
TaskId = Annotated[
    str, Path(min_length=1, max_length=client.MAX_JOB_ID_LENGTH, pattern=r"^[!-~]+$", description="a job id")
]
QueueName = Annotated[str, Path(min_length=1, max_length=64, description="analytics, maintenance or notifications")]


class JobRequest(BaseModel):
    # strict: a boolean is not a priority and a string is not a number; unknown fields are refused, not ignored
    model_config = ConfigDict(strict=True, extra="forbid")

    task_name: str = Field(
        min_length=1,
        max_length=100,
        description="a task of docs/tasks.md (GET /tasks lists them)",
        examples=["refresh_all_materialized_views", "check_low_stock_products"],
    )
    args: list[Any] = Field(default_factory=list, max_length=100, description="bound to the task's fields in order")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="checked against the task's argument model")
    priority: int = Field(default=PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="9 runs first")
    defer_seconds: float = Field(
        default=0, ge=0, le=client.MAX_DEFER_SECONDS, description="start no sooner; below 1 ms the job is queued"
    )


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


@router.post("/jobs", status_code=202, responses=error_responses(401, 403, 409, 413, 422, 429))
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
    except UnknownTaskError as exc:
        raise HTTPException(422, detail=f"task_name: {exc}") from None
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except client.NotReplicatedError as exc:  # queued on the master, not yet safe from a failover
        raise HTTPException(503, detail=str(exc)) from None
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


@router.get("/jobs", responses=error_responses(401, 403, 422))
async def list_jobs(
    redis: RedisDep,
    db: DbDep,
    caller: ReadDep,
    queue: Queue | None = None,
    status: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[JobStatus]:
    jobs = await client.list_jobs(redis, db, queue=queue.value if queue else None, status=status, limit=limit)
    return [client.shown_to(caller, job) for job in jobs]


@router.get("/jobs/{task_id}", responses=error_responses(401, 403, 404, 422))
async def get_job(task_id: TaskId, redis: RedisDep, db: DbDep, caller: ReadDep) -> JobStatus:
    """The job's traceback (after an exception) is shown to admin tokens only; others get its error message."""
    try:
        return client.shown_to(caller, await client.job_status(redis, db, task_id))
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None


@router.delete("/jobs/{task_id}", responses=error_responses(401, 403, 404, 409, 422))
async def abort_job(task_id: TaskId, redis: RedisDep, db: DbDep, principal: PrincipalDep) -> JobAborted:
    try:
        previous = await client.abort_job(redis, db, principal, task_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return JobAborted(task_id=task_id, aborted=True, previous_status=previous)


@router.post("/jobs/{task_id}/retry", status_code=202, responses=error_responses(401, 403, 404, 409, 422, 429))
async def retry_job(task_id: TaskId, redis: RedisDep, db: DbDep, principal: PrincipalDep) -> JobRetried:
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


@router.post("/queues/{queue}/purge", responses=error_responses(401, 403, 404, 422))
async def purge_queue(queue: QueueName, redis: RedisDep, principal: PrincipalDep) -> QueuePurged:
    try:
        removed = await client.purge_queue(redis, principal, queue)
    except ValueError as exc:  # the only ValueError is an unknown queue, a resource in the path
        raise HTTPException(404, detail=str(exc)) from None
    return QueuePurged(queue=queue, removed=removed)


@router.get("/queues", responses=error_responses(401, 403))
async def queues(redis: RedisDep, _: ReadDep) -> dict[str, QueueCounts]:
    return {name: QueueCounts(**counts) for name, counts in (await client.queue_overview(redis)).items()}


@router.get("/tasks", responses=error_responses(401, 403))
async def tasks(_: ReadDep) -> list[TaskInfo]:
    return client.task_table()
