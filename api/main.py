"""FastAPI app: lifespan opens one asyncpg pool and one Redis pool; routes live in api.rest and api.graphql."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp

from api.auth import TokenVerifier
from api.customers import router as customers_router
from api.dashboard import router as dashboard_router
from api.deps import DbDep, RedisDep
from api.errors import error_responses, install_error_handlers
from api.exports import router as exports_router
from api.graphql import GraphQLRefusedError, graphql_view, refused_answer
from api.graphql_memo import GraphQLMemo, Memo, MemoFront
from api.limits import BodyLimit
from api.notifications import router as notifications_router
from api.reports import router as reports_router
from api.rest import router
from api.security import harden
from salesdash import tracing
from salesdash.config import Settings, get_settings
from salesdash.connections import open_db_pool, open_redis
from salesdash.logs import setup_logging
from worker import client
from worker import health as health_report
from worker.metrics import METRICS_KEY, families

log = logging.getLogger("salesdash.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    app.state.db = await open_db_pool(settings)
    app.state.redis = await open_redis(settings)
    # Everything made so far (modules, schemas, models, routes: ~120,000 objects) lives as long as the process:
    # moved out of the collector's sight, a full collection walks only what requests made since, and stops the
    # event loop for a few ms instead of ~110 ms, several times a second under load (bench/api.py: p99 halved)
    gc.collect()
    gc.freeze()
    try:
        async with app.state.tokens.flushing(app.state.db, settings.token_last_used_interval_s):
            yield
    finally:
        await app.state.redis.aclose(close_connection_pool=True)
        await app.state.db.close()
        tracing.flush()


class _Snapshot:
    """A prometheus_client collector over values read from Redis for this one scrape."""

    def __init__(
        self,
        raw: dict[bytes, bytes],
        depths: dict[str, int],
        workers: dict[str, int],
        health: health_report.HealthReport | None,
        oldest_waits: dict[str, float] | None = None,
    ) -> None:
        self.args = (raw, depths, workers, oldest_waits)
        self.health = health

    def collect(self) -> Any:
        yield from families(*self.args)
        yield from health_report.families(self.health)


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    postgres: Literal["ok", "unreachable"]
    redis: Literal["ok", "unreachable"]


async def _reachable(check: Awaitable[object]) -> Literal["ok", "unreachable"]:
    try:
        await asyncio.wait_for(check, timeout=2)
    except Exception as exc:  # any failure means not ready; the reason goes to the log, not to the prober
        log.warning("readiness check failed: %r", exc)
        return "unreachable"
    return "ok"


def _in_front(app: FastAPI, front: Callable[..., ASGIApp], **options: Any) -> None:
    """`front` before the whole middleware stack Starlette builds (ServerErrorMiddleware first), given the app."""
    build = app.build_middleware_stack

    def build_with_front() -> ASGIApp:
        return front(build(), app, **options)

    app.build_middleware_stack = build_with_front  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # FastAPI's own telemetry off: salesdash.tracing instruments the app when tracing is on, and FastAPI's looks up
    # the OpenTelemetry providers on every request (a sixth of a memoized dashboard answer's CPU)
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="salesdash", lifespan=lifespan, responses=error_responses(503), telemetry=telemetry)
    app.state.tokens = TokenVerifier.from_settings(settings)
    # dashboard-only queries answered again without executing them; inside the security headers and the dependency
    # guard, whose headers and 503s its answers share (a hit that needs no waiting is answered by MemoFront, below)
    memos: dict[bytes, Memo] = {}
    app.add_middleware(GraphQLMemo, memos=memos)
    harden(app, settings)
    # GraphQL first: routes are matched in order, and a trigger through it should not try every REST route before.
    # An ASGI app, which Starlette routes to as it is (its typing knows only request handlers); GraphQL has its own
    # schema (docs/graphql.md), the OpenAPI document is REST's
    graphql = graphql_view(settings)
    app.add_route("/graphql", graphql, methods=["GET", "POST"], include_in_schema=False)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(reports_router)
    app.include_router(exports_router)
    app.include_router(dashboard_router)
    app.include_router(customers_router)
    app.include_router(notifications_router)
    install_error_handlers(app)
    app.add_exception_handler(GraphQLRefusedError, refused_answer)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit)
    tracing.configure("salesdash-api")  # off without OTEL_EXPORTER_OTLP_ENDPOINT
    tracing.instrument_app(app)
    if not tracing.enabled():  # traced, a memo hit keeps its server span: answered inside the stack
        _in_front(app, MemoFront, memos=memos, cors=bool(settings.cors_origin_list))

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        responses={503: {"model": Readiness, "description": "PostgreSQL or Redis is unreachable (the one that is)"}},
    )
    async def readyz(db: DbDep, redis: RedisDep) -> JSONResponse:
        postgres, redis_state = await asyncio.gather(_reachable(db.fetchval("SELECT 1")), _reachable(redis.ping()))
        readiness = Readiness(ready=postgres == redis_state == "ok", postgres=postgres, redis=redis_state)
        headers = None if readiness.ready else {"Retry-After": str(get_settings().api_retry_after_s)}
        return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503, headers=headers)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
    )
    async def metrics(redis: RedisDep) -> Response:
        raw = await redis.hgetall(METRICS_KEY)  # type: ignore[misc]
        overview = await client.queue_overview(redis)
        depths = {name: counts["queued"] for name, counts in overview.items()}
        alive = {name: counts["workers"] for name, counts in overview.items()}
        registry = CollectorRegistry(auto_describe=False)
        health = await health_report.last_report(redis)
        oldest = {queue: waited or 0.0 for queue, waited in (await client.oldest_waits(redis)).items()}
        registry.register(_Snapshot(raw, depths, alive, health, oldest))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app


app = create_app()
