"""Strawberry GraphQL at /graphql (docs/graphql.md): thin resolvers over worker.client, which checks scopes.
A refusal is a GraphQL error with extensions.code UNAUTHENTICATED or FORBIDDEN; other failures are results with
success false and a message."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

import asyncpg
import strawberry
from fastapi import Depends, Request
from graphql import GraphQLError
from pydantic import BaseModel
from redis.asyncio import Redis
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.scalars import JSON

from api import dashboard_types as dt
from api.auth import TokenVerifier
from api.deps import get_db, get_redis, get_tokens
from api.graphql_memo import RECORDER, Recorder
from salesdash.auth import AuthError, Principal, Scope, require
from worker import client, dashboard
from worker.cache import CacheBusyError, CacheEntry
from worker.records import JobStatus, Progress, TaskInfo
from worker.registry import UnknownTaskError


@contextmanager
def auth_errors() -> Iterator[None]:
    """Report an AuthError, whoever raised it, as a GraphQL error with its code (docs/graphql.md)."""
    try:
        yield
    except AuthError as exc:
        raise GraphQLError(str(exc), extensions={"code": exc.code}) from None


class Context(BaseContext):
    def __init__(
        self,
        db: asyncpg.Pool,
        redis: Redis,
        tokens: TokenVerifier,
        authorization: str | None,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.redis = redis
        self.tokens = tokens
        self.authorization = authorization
        self.recorder = recorder  # api.graphql_memo's, when the request came through it
        self._principal: Principal | None = None

    async def principal(self) -> Principal:
        """The caller, authenticated once per request (a query may resolve several fields)."""
        with auth_errors():
            if self._principal is None:
                self._principal = await self.tokens.authenticate(self.db, self.authorization)
        return self._principal

    async def require(self, needed: Scope) -> None:
        """For read-only fields, whose service functions take no principal."""
        principal = await self.principal()
        with auth_errors():
            require(principal, needed)


async def get_context(
    request: Request,
    db: asyncpg.Pool = Depends(get_db),
    redis: Redis = Depends(get_redis),
    tokens: TokenVerifier = Depends(get_tokens),
) -> Context:
    return Context(db, redis, tokens, request.headers.get("authorization"), request.scope.get(RECORDER))


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
class PurgeResult:
    success: bool
    message: str
    removed: int | None  # null when nothing was purged


@strawberry.experimental.pydantic.type(model=Progress, all_fields=True)
class JobProgress:
    pass


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
    progress: JobProgress | None

    @classmethod
    def from_status(cls, s: JobStatus) -> TaskStatus:
        return cls(
            task_id=s.task_id,
            task_name=s.task_name,
            queue=s.queue,
            status=s.status,
            result=s.result,
            error=s.error,
            enqueued_at=s.enqueued_at,
            started_at=s.started_at,
            finished_at=s.finished_at,
            tries=s.tries,
            priority=s.priority,
            progress=JobProgress.from_pydantic(s.progress) if s.progress else None,
        )


@strawberry.experimental.pydantic.type(model=TaskInfo, all_fields=True)
class BackgroundTask:
    pass


P = TypeVar("P", bound=BaseModel)
RangeArg = Annotated[
    str, strawberry.argument(name="range", description="today, yesterday, last_7_days, last_30_days or month_to_date")
]
ByArg = Annotated[str, strawberry.argument(description="revenue or units")]


async def _dashboard(
    info: strawberry.Info[Context, None], query: dashboard.DashboardQuery[P], args: Mapping[str, Any]
) -> CacheEntry[P]:
    """A dashboard payload from the cache, for a read token; a bad argument is a GraphQL error naming it."""
    await info.context.require(Scope.READ)
    try:
        entry = await dashboard.read(info.context.redis, info.context.db, query, args)
    except dashboard.DashboardArgumentError as exc:
        raise GraphQLError(str(exc), extensions={"code": "BAD_USER_INPUT", "argument": exc.argument}) from None
    except CacheBusyError as exc:
        raise GraphQLError(str(exc), extensions={"code": "UNAVAILABLE"}) from None
    if info.context.recorder is not None:
        info.context.recorder.record(query, dict(args), entry)
    return entry


@strawberry.type
class DashboardQueries:
    """Dashboard payloads, served from the Redis cache (warm_dashboard_cache keeps the defaults warm)."""

    @strawberry.field
    async def sales_overview(self, info: strawberry.Info[Context, None], range_: RangeArg) -> dt.SalesOverview | None:
        entry = await _dashboard(info, dashboard.SALES_OVERVIEW, {"range": range_})
        return dt.SalesOverview.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def hourly_metrics(self, info: strawberry.Info[Context, None], hours: int = 48) -> dt.HourlyMetrics | None:
        entry = await _dashboard(info, dashboard.HOURLY_METRICS, {"hours": hours})
        return dt.HourlyMetrics.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def top_products(
        self, info: strawberry.Info[Context, None], range_: RangeArg, limit: int = 10, by: ByArg = "revenue"
    ) -> dt.TopProducts | None:
        entry = await _dashboard(info, dashboard.TOP_PRODUCTS, {"range": range_, "limit": limit, "by": by})
        return dt.TopProducts.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def top_categories(
        self, info: strawberry.Info[Context, None], range_: RangeArg, limit: int = 10, by: ByArg = "revenue"
    ) -> dt.TopCategories | None:
        entry = await _dashboard(info, dashboard.TOP_CATEGORIES, {"range": range_, "limit": limit, "by": by})
        return dt.TopCategories.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def category_breakdown(
        self, info: strawberry.Info[Context, None], range_: RangeArg
    ) -> dt.CategoryBreakdown | None:
        entry = await _dashboard(info, dashboard.CATEGORY_BREAKDOWN, {"range": range_})
        return dt.CategoryBreakdown.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def customer_segments(self, info: strawberry.Info[Context, None]) -> dt.CustomerSegments | None:
        entry = await _dashboard(info, dashboard.CUSTOMER_SEGMENTS, {})
        return dt.CustomerSegments.from_pydantic(entry.data, extra=dt.meta(entry))

    @strawberry.field
    async def low_stock_products(self, info: strawberry.Info[Context, None]) -> dt.LowStockProducts | None:
        entry = await _dashboard(info, dashboard.LOW_STOCK_PRODUCTS, {})
        return dt.LowStockProducts.from_pydantic(entry.data, extra=dt.meta(entry))


@strawberry.type
class Query(DashboardQueries):
    @strawberry.field
    async def task_status(self, info: strawberry.Info[Context, None], task_id: str) -> TaskStatus | None:
        await info.context.require(Scope.READ)
        try:
            return TaskStatus.from_status(await client.job_status(info.context.redis, info.context.db, task_id))
        except client.JobNotFoundError:
            return None

    @strawberry.field
    async def background_tasks(self, info: strawberry.Info[Context, None]) -> list[BackgroundTask]:
        await info.context.require(Scope.READ)
        return [BackgroundTask.from_pydantic(task) for task in client.task_table()]


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def trigger_background_task(
        self,
        info: strawberry.Info[Context, None],
        task_name: str,
        args: JSON | None = None,
        kwargs: JSON | None = None,
        priority: int = 5,
        defer_seconds: float = 0,
    ) -> TriggerResult:
        principal = await info.context.principal()
        try:
            with auth_errors():
                # JSON scalars arrive as any JSON value; the service refuses anything but an array / an object
                positional: Any = args
                named: Any = kwargs
                job = await client.enqueue_task(
                    info.context.redis, principal, task_name, positional, named, priority, defer_seconds
                )
        except (UnknownTaskError, ValueError) as exc:
            return TriggerResult(success=False, task_id=None, message=str(exc), queue=None)
        return TriggerResult(
            success=True,
            task_id=job.task_id,
            queue=job.queue,
            message=f"{job.task_name} enqueued on {job.queue} with priority {job.priority}",
        )

    @strawberry.mutation
    async def abort_task(self, info: strawberry.Info[Context, None], task_id: str) -> AbortResult:
        principal = await info.context.principal()
        try:
            with auth_errors():
                previous = await client.abort_job(info.context.redis, info.context.db, principal, task_id)
        except (client.JobNotFoundError, client.JobStateError) as exc:
            return AbortResult(success=False, message=str(exc), previous_status=None)
        return AbortResult(success=True, message=f"job {task_id} aborted", previous_status=previous)

    @strawberry.mutation
    async def retry_task(self, info: strawberry.Info[Context, None], task_id: str) -> TriggerResult:
        principal = await info.context.principal()
        try:
            with auth_errors():
                job = await client.retry_job(info.context.redis, info.context.db, principal, task_id)
        except (client.JobNotFoundError, client.JobStateError, UnknownTaskError, ValueError) as exc:
            return TriggerResult(success=False, task_id=None, message=str(exc), queue=None)
        return TriggerResult(success=True, task_id=job.task_id, queue=job.queue, message=f"retry of {task_id} enqueued")

    @strawberry.mutation
    async def purge_queue(self, info: strawberry.Info[Context, None], queue: str) -> PurgeResult:
        principal = await info.context.principal()
        try:
            with auth_errors():
                removed = await client.purge_queue(info.context.redis, principal, queue)
        except ValueError as exc:
            return PurgeResult(success=False, message=str(exc), removed=None)
        return PurgeResult(success=True, message=f"{removed} waiting jobs dropped from {queue}", removed=removed)


schema = strawberry.Schema(query=Query, mutation=Mutation)


def graphql_router() -> GraphQLRouter[Context, None]:
    return GraphQLRouter(schema, context_getter=get_context)
