"""FastAPI app: lifespan opens one asyncpg pool and one Redis pool; routes live in api.rest and api.graphql."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest

from api.auth import TokenVerifier
from api.customers import router as customers_router
from api.dashboard import router as dashboard_router
from api.deps import DbDep, RedisDep
from api.exports import router as exports_router
from api.graphql import graphql_router
from api.graphql_memo import GraphQLMemo
from api.reports import router as reports_router
from api.rest import router
from salesdash.auth import AuthError
from salesdash.config import get_settings
from salesdash.connections import open_db_pool, open_redis
from salesdash.logs import setup_logging
from worker import client
from worker import health as health_report
from worker.metrics import METRICS_KEY, families


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    app.state.db = await open_db_pool(settings)
    app.state.redis = await open_redis(settings)
    try:
        async with app.state.tokens.flushing(app.state.db, settings.token_last_used_interval_s):
            yield
    finally:
        await app.state.redis.aclose(close_connection_pool=True)
        await app.state.db.close()


class _Snapshot:
    """A prometheus_client collector over values read from Redis for this one scrape."""

    def __init__(
        self,
        raw: dict[bytes, bytes],
        depths: dict[str, int],
        workers: dict[str, int],
        health: health_report.HealthReport | None,
    ) -> None:
        self.args = (raw, depths, workers)
        self.health = health

    def collect(self) -> Any:
        yield from families(*self.args)
        yield from health_report.families(self.health)


async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=exc.status_code, headers=headers)


def create_app() -> FastAPI:
    app = FastAPI(title="salesdash", lifespan=lifespan)
    app.state.tokens = TokenVerifier.from_settings(get_settings())
    app.include_router(router)
    app.include_router(reports_router)
    app.include_router(exports_router)
    app.include_router(dashboard_router)
    app.include_router(customers_router)
    app.add_exception_handler(AuthError, _auth_error)  # type: ignore[arg-type]
    app.include_router(graphql_router(), prefix="/graphql")
    app.add_middleware(GraphQLMemo)  # dashboard-only queries answered again without executing them

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(db: DbDep, redis: RedisDep) -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await db.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {exc}"
        try:
            await redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {exc}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(redis: RedisDep) -> Response:
        raw = await redis.hgetall(METRICS_KEY)  # type: ignore[misc]
        overview = await client.queue_overview(redis)
        depths = {name: counts["queued"] for name, counts in overview.items()}
        alive = {name: counts["workers"] for name, counts in overview.items()}
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(raw, depths, alive, await health_report.last_report(redis)))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app


app = create_app()
