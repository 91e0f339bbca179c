"""The job context every queue's worker shares: one asyncpg pool per worker process, opened at start."""

from __future__ import annotations

from typing import Any

from salesdash import tracing
from salesdash.config import get_settings
from salesdash.connections import open_db_pool
from salesdash.logs import setup_logging


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    tracing.configure(f"salesdash-worker-{ctx.get('queue', 'unknown')}")  # off without OTEL_EXPORTER_OTLP_ENDPOINT
    ctx["settings"] = settings
    ctx["db"] = await open_db_pool(settings)


async def shutdown(ctx: dict[str, Any]) -> None:
    pool = ctx.pop("db", None)
    if pool is not None:
        await pool.close()
    tracing.flush()
