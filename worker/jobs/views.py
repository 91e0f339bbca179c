"""Analytics rollup jobs: the realtime (hourly) and daily families brought up to date incrementally, or everything
rebuilt from orders. The work and its record are in db/queries/views.py."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from db.queries.views import Family, RefreshLimits, RefreshOutcome, rebuild, refresh_family
from salesdash.config import Settings
from worker.progress import report_progress
from worker.registry import get_task


def _options(ctx: dict[str, Any], task: str) -> dict[str, Any]:
    settings: Settings = ctx["settings"]

    async def progress(fraction: float, message: str) -> None:
        await report_progress(ctx, fraction, message)

    # a statement never outlives the job's own time limit
    limits = RefreshLimits(settings.rollup_lock_timeout, statement_timeout_s=get_task(task).timeout_s)
    return {"timezone": settings.timezone, "limits": limits, "progress": progress}


async def _refresh(ctx: dict[str, Any], task: str, family: Family | None) -> dict[str, Any]:
    outcome: RefreshOutcome
    async with ctx["db"].acquire() as conn:
        if family is None:
            outcome = await rebuild(conn, **_options(ctx, task))
        else:
            outcome = await refresh_family(conn, family, **_options(ctx, task))
    return asdict(outcome)


async def refresh_realtime_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, "refresh_realtime_materialized_views", Family.REALTIME)


async def refresh_daily_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, "refresh_daily_materialized_views", Family.DAILY)


async def refresh_all_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, "refresh_all_materialized_views", None)
