"""The job context every queue's worker shares: one asyncpg pool per worker process, opened at start."""

from __future__ import annotations

import logging
from typing import Any

from salesdash.config import get_settings
from salesdash.connections import open_db_pool
from salesdash.logs import setup_logging
from worker.retry import dependency_down

logger = logging.getLogger("salesdash.worker")


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    ctx["settings"] = settings
    try:
        ctx["db"] = await open_db_pool(settings)
    except Exception as exc:
        if dependency_down(exc) != "postgresql":
            raise
        # start anyway: jobs that need the database wait for it without spending tries (worker/retry.py)
        logger.warning(
            "postgresql unreachable at start; jobs that need it will wait for it",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
        ctx["db"] = await open_db_pool(settings, connect_now=False)


async def shutdown(ctx: dict[str, Any]) -> None:
    pool = ctx.pop("db", None)
    if pool is not None:
        await pool.close()
