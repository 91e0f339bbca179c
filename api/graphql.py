"""Strawberry GraphQL at /graphql (CONTRACT §4): thin resolvers over worker.client."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import strawberry
from fastapi import Depends, Request
from graphql import GraphQLError
from redis.asyncio import Redis
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.scalars import JSON

from api.auth import AuthError, Principal, authenticate, require
from api.deps import get_db, get_redis
from worker import client
from worker.registry import TASKS, Scope, UnknownTaskError, get_task


class Context(BaseContext):
    def __init__(self, db: asyncpg.Pool, redis: Redis, authorization: str | None) -> None:
        super().__init__()
        self.db = db
        self.redis = redis
        self.authorization = authorization
        self._principal: Principal | None = None

    async def principal(self, needed: Scope) -> Principal:
        try:
            if self._principal is None:
                self._principal = await authenticate(self.db, self.authorization)
            require(self._principal, needed)
        except AuthError as exc:
            raise GraphQLError(str(exc), extensions={"code": exc.code}) from None
        return self._principal


async def get_context(request: Request, db: asyncpg.Pool = Depends(get_db),
                      redis: Redis = Depends(get_redis)) -> Context:
    return Context(db, redis, request.headers.get("authorization"))


@strawberry.type
class TriggerResult:
    success: bool
    task_id: str | None
    message: str
    queue: str | None


@strawberry.type
class AbortResult:
    success: bool
    message: str
    previous_status: str | None


@strawberry.type
class TaskStatus:
    task_id: str
    task_name: str
    queue: str
    status: str
    result: JSON | None
    error: str | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    tries: int
    priority: int
    progress: JSON | None

    @classmethod
    def from_status(cls, s: dict[str, Any]) -> TaskStatus:
        return cls(task_id=s["task_id"], task_name=s["task_name"], queue=s["queue"], status=s["status"],
                   result=s["result"], error=s["error"], enqueued_at=s["enqueued_at"],
                   started_at=s["started_at"], finished_at=s["finished_at"], tries=s["tries"],
                   priority=s["priority"], progress=s["progress"])


@strawberry.type
class BackgroundTask:
    name: str
    queue: str
    schedule: str
    description: str
    scope: str


@strawberry.type
class Query:
    @strawberry.field
    async def task_status(self, info: strawberry.Info[Context, None], task_id: str) -> TaskStatus | None:
        await info.context.principal(Scope.READ)
        try:
            return TaskStatus.from_status(await client.job_status(info.context.redis, info.context.db, task_id))
        except client.JobNotFoundError:
            return None

    @strawberry.field
    async def background_tasks(self, info: strawberry.Info[Context, None]) -> list[BackgroundTask]:
        await info.context.principal(Scope.READ)
        return [BackgroundTask(name=s.name, queue=s.queue.value,
                               schedule=s.schedule.text if s.schedule else "on demand",
                               description=s.description, scope=s.scope.value) for s in TASKS.values()]


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def trigger_background_task(
        self, info: strawberry.Info[Context, None], task_name: str, args: JSON | None = None,
        kwargs: JSON | None = None, priority: int = 5, defer_seconds: float = 0,
    ) -> TriggerResult:
        principal = await info.context.principal(Scope.TRIGGER)
        try:
            spec = get_task(task_name)
            if not principal.allows(spec.scope):
                return TriggerResult(success=False, task_id=None, queue=spec.queue.value,
                                     message=f"{task_name} needs the {spec.scope.value!r} scope")
            job = await client.enqueue_task(info.context.redis, task_name, args, kwargs,  # type: ignore[arg-type]
                                            priority, defer_seconds)
        except (UnknownTaskError, ValueError) as exc:
            return TriggerResult(success=False, task_id=None, message=str(exc), queue=None)
        return TriggerResult(success=True, task_id=job.task_id, queue=job.queue,
                             message=f"{job.task_name} enqueued on {job.queue} with priority {job.priority}")

    @strawberry.mutation
    async def abort_task(self, info: strawberry.Info[Context, None], task_id: str) -> AbortResult:
        await info.context.principal(Scope.TRIGGER)
        try:
            previous = await client.abort_job(info.context.redis, info.context.db, task_id)
        except (client.JobNotFoundError, client.JobStateError) as exc:
            return AbortResult(success=False, message=str(exc), previous_status=None)
        return AbortResult(success=True, message=f"job {task_id} aborted", previous_status=previous)

    @strawberry.mutation
    async def retry_task(self, info: strawberry.Info[Context, None], task_id: str) -> TriggerResult:
        await info.context.principal(Scope.TRIGGER)
        try:
            job = await client.retry_job(info.context.redis, info.context.db, task_id)
        except (client.JobNotFoundError, client.JobStateError, UnknownTaskError, ValueError) as exc:
            return TriggerResult(success=False, task_id=None, message=str(exc), queue=None)
        return TriggerResult(success=True, task_id=job.task_id, queue=job.queue,
                             message=f"retry of {task_id} enqueued")


schema = strawberry.Schema(query=Query, mutation=Mutation)


def graphql_router() -> GraphQLRouter[Context, None]:
    return GraphQLRouter(schema, context_getter=get_context)
