"""Strawberry GraphQL at /graphql (docs/graphql.md): thin resolvers over worker.client, which checks scopes.
A refusal is a GraphQL error with extensions.code UNAUTHENTICATED or FORBIDDEN; other failures are results with
success false and a message."""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar, overload

import asyncpg
import strawberry
from graphql import GraphQLError
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.fastapi import BaseContext
from strawberry.http import GraphQLHTTPResponse
from strawberry.http.ides import GraphQL_IDE
from strawberry.scalars import JSON
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET

from api import dashboard_types as dt
from api import graphql_direct, sessions
from api.auth import TokenVerifier
from api.errors import DependencyDownError, unreachable_dependency
from api.graphql_memo import RECORDER, Recorder
from api.graphql_rules import RequestRules, Schema
from salesdash.auth import AuthError, Principal, Scope, require
from salesdash.config import Settings, get_settings
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


class GraphQLRefusedError(Exception):
    """A request refused at the door, before its query is parsed: answered as a GraphQL error (api.main)."""

    def __init__(self, error: AuthError) -> None:
        super().__init__(str(error))
        self.code = error.code


@contextmanager
def trigger_refusals() -> Iterator[None]:
    """A trigger refused for its token: RATE_LIMITED (with retryAfter, seconds) or IDEMPOTENCY_CONFLICT."""
    try:
        yield
    except client.RateLimitedError as exc:
        raise GraphQLError(str(exc), extensions={"code": "RATE_LIMITED", "retryAfter": exc.retry_after_s}) from None
    except client.IdempotencyConflictError as exc:
        raise GraphQLError(str(exc), extensions={"code": "IDEMPOTENCY_CONFLICT"}) from None


class Context(BaseContext):
    def __init__(
        self,
        db: asyncpg.Pool,
        redis: Redis,
        tokens: TokenVerifier,
        authorization: str | None,
        session_id: str | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.redis = redis
        self.tokens = tokens
        self.authorization = authorization
        self.session_id = session_id  # GraphiQL in a browser signed in to the dashboard
        self.recorder = recorder  # api.graphql_memo's, when the request came through it
        self._principal: Principal | None = None

    async def authenticate(self) -> Principal:
        """The caller, authenticated once per request (a query may resolve several fields): the bearer token, else
        the dashboard session; AuthError when neither is valid."""
        if self._principal is None:
            self._principal = await self._authenticate()
        return self._principal

    async def _authenticate(self) -> Principal:
        if self.session_id and not self.authorization:
            return await sessions.session_principal(self.redis, self.db, self.tokens, self.session_id)
        return await self.tokens.authenticate(self.db, self.authorization)

    async def principal(self) -> Principal:
        """The caller, as a GraphQL error with its code when refused (docs/graphql.md)."""
        with auth_errors():
            return await self.authenticate()

    async def require(self, needed: Scope) -> None:
        """For read-only fields, whose service functions take no principal."""
        principal = await self.principal()
        with auth_errors():
            require(principal, needed)


def request_context(request: Request) -> Context:
    """The request's context, over the pools the app's lifespan opened."""
    state = request.app.state
    return Context(
        state.db,
        state.redis,
        state.tokens,
        request.headers.get("authorization"),
        request.cookies.get(sessions.COOKIE),
        request.scope.get(RECORDER),
    )


async def refused_answer(_: Request, exc: GraphQLRefusedError) -> JSONResponse:
    return JSONResponse({"data": None, "errors": [{"message": str(exc), "extensions": {"code": exc.code}}]})


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
    waiting_for: str | None = strawberry.field(
        description="postgresql or redis: a deferred job waiting for it to come back, spending no try"
    )

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
            waiting_for=s.waiting_for,
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
        idempotency_key: str | None = None,
    ) -> TriggerResult:
        principal = await info.context.principal()
        try:
            with auth_errors(), trigger_refusals():
                # JSON scalars arrive as any JSON value; the service refuses anything but an array / an object
                positional: Any = args
                named: Any = kwargs
                job = await client.enqueue_task(
                    info.context.redis,
                    principal,
                    task_name,
                    positional,
                    named,
                    priority,
                    defer_seconds,
                    idempotency_key=idempotency_key,
                )
        except (UnknownTaskError, ValueError) as exc:
            return TriggerResult(success=False, task_id=None, message=str(exc), queue=None)
        except client.NotReplicatedError as exc:  # queued on the master, not yet safe from a failover
            return TriggerResult(success=False, task_id=exc.job_id, message=str(exc), queue=None)
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
            with auth_errors(), trigger_refusals():
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


def make_schema(introspection: bool = True) -> strawberry.Schema:
    return Schema(query=Query, mutation=Mutation, extensions=[lambda: RequestRules(introspection)])


schema = make_schema()


class GraphQLView(GraphQL[Context, None]):
    """Strawberry's view for plain Starlette, routed to without FastAPI's request handling (dependency injection,
    response wrapping): through strawberry's FastAPI router that was a third of a trigger's CPU (bench/api.py).

    It authenticates first: a request without a valid token or session costs one lookup, whatever the size of its
    query, which is never parsed. Only GraphiQL's page (a GET without a query) is let through, to its sign-in.
    GraphiQL itself is for a caller with a token or a dashboard session; the page says where to sign in."""

    def __init__(self, schema: strawberry.Schema, *, introspection: bool, graphql_ide: GraphQL_IDE | None) -> None:
        super().__init__(schema, graphql_ide=graphql_ide)
        self.strawberry_schema = schema
        self.introspection = introspection

    @overload
    async def run(self, request: Request, context: Context = UNSET, root_value: None = UNSET) -> Response: ...

    @overload
    async def run(self, request: WebSocket, context: Context = UNSET, root_value: None = UNSET) -> WebSocket: ...

    async def run(
        self, request: Request | WebSocket, context: Context = UNSET, root_value: None = UNSET
    ) -> Response | WebSocket:
        """A plain request executed directly (api.graphql_direct); the rest as strawberry does."""
        if isinstance(request, WebSocket):
            return await super().run(request, context, root_value)
        if graphql_direct.may_be_plain(request):
            sub_response = await self.get_sub_response(request)
            context = await self.get_context(request, sub_response)
            result = await graphql_direct.execute_plain(request, self.strawberry_schema, self.introspection, context)
            if result is not None:
                return self.create_response(await self.process_result(request, result), sub_response)
        return await super().run(request, context, root_value)

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        assert isinstance(request, Request)  # no subscriptions: strawberry routes no websocket here
        context = request_context(request)
        if request.method != "GET" or "query" in request.query_params:
            try:
                await context.authenticate()
            except AuthError as exc:
                raise GraphQLRefusedError(exc) from None
        return context

    async def render_graphql_ide(self, request: Request) -> Response:
        try:
            require(await sessions.request_principal(request), Scope.READ)
        except AuthError as exc:
            return HTMLResponse(_GRAPHIQL_SIGN_IN.format(message=html.escape(str(exc))), status_code=exc.status_code)
        return await super().render_graphql_ide(request)

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        """A field that failed because PostgreSQL or Redis is unreachable makes the whole answer a 503."""
        for error in result.errors or ():
            dependency = unreachable_dependency(error.original_error) if error.original_error else None
            if dependency is not None:
                raise DependencyDownError(dependency)
        return await super().process_result(request, result)


_GRAPHIQL_SIGN_IN = """<!doctype html><meta charset="utf-8"><title>salesdash · GraphiQL</title>
<p style="font:14px system-ui;margin:3rem">{message}. GraphiQL needs a token:
<a href="/dashboard">sign in on the dashboard</a>, then come back.</p>"""


def graphql_view(settings: Settings | None = None) -> GraphQLView:
    settings = settings or get_settings()
    introspection = settings.graphql_introspection
    ide: GraphQL_IDE | None = "graphiql" if settings.graphiql else None
    return GraphQLView(make_schema(introspection), introspection=introspection, graphql_ide=ide)
