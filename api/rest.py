"""REST routes (CONTRACT §5): thin, they parse, call worker.client, and shape the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from api.auth import require
from api.deps import DbDep, ReadDep, RedisDep, TriggerDep
from worker import client, jobstore
from worker.registry import TASKS, UnknownTaskError, get_task

router = APIRouter()


class JobRequest(BaseModel):  # type: ignore[no-redef]  # the pydantic plugin trips on a field named kwargs
    task_name: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    priority: int = jobstore.PRIORITY_DEFAULT
    defer_seconds: float = 0


def _public(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "worker_id"}


@router.post("/jobs", status_code=202)
async def create_job(body: JobRequest, redis: RedisDep, principal: TriggerDep) -> dict[str, Any]:
    try:
        require(principal, get_task(body.task_name).scope)
        job = await client.enqueue_task(redis, body.task_name, body.args, body.kwargs, body.priority,
                                        body.defer_seconds)
    except (UnknownTaskError, ValueError) as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return {"task_id": job.task_id, "task_name": job.task_name, "queue": job.queue, "priority": job.priority,
            "status": "deferred" if body.defer_seconds else "queued"}


@router.get("/jobs")
async def list_jobs(redis: RedisDep, db: DbDep, _: ReadDep, queue: str | None = None, status: str | None = None,
                    limit: int = Query(50)) -> list[dict[str, Any]]:
    try:
        jobs = await client.list_jobs(redis, db, queue=queue, status=status, limit=limit)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return [_public(j) for j in jobs]


@router.get("/jobs/{task_id}")
async def get_job(task_id: str, redis: RedisDep, db: DbDep, _: ReadDep) -> dict[str, Any]:
    try:
        return _public(await client.job_status(redis, db, task_id))
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None


@router.delete("/jobs/{task_id}")
async def abort_job(task_id: str, redis: RedisDep, db: DbDep, _: TriggerDep) -> dict[str, Any]:
    try:
        previous = await client.abort_job(redis, db, task_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return {"task_id": task_id, "aborted": True, "previous_status": previous}


@router.post("/jobs/{task_id}/retry", status_code=202)
async def retry_job(task_id: str, redis: RedisDep, db: DbDep, principal: TriggerDep) -> dict[str, Any]:
    try:
        status = await client.job_status(redis, db, task_id)
        require(principal, get_task(status["task_name"]).scope)
        job = await client.retry_job(redis, db, task_id)
    except client.JobNotFoundError as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except client.JobStateError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return {"task_id": job.task_id, "retry_of": task_id, "task_name": job.task_name, "queue": job.queue}


@router.get("/queues")
async def queues(redis: RedisDep, _: ReadDep) -> dict[str, Any]:
    return await client.queue_overview(redis)


@router.get("/tasks")
async def tasks(_: ReadDep) -> list[dict[str, Any]]:
    return [{"name": s.name, "queue": s.queue.value, "schedule": s.schedule.text if s.schedule else "on demand",
             "description": s.description, "scope": s.scope.value} for s in TASKS.values()]
