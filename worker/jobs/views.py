"""Materialized-view refresh jobs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from db.queries.views import ALL_VIEWS, DAILY_VIEWS, REALTIME_VIEWS, refresh_view
from worker.progress import report_progress


async def _refresh(ctx: dict[str, Any], views: tuple[str, ...]) -> dict[str, Any]:
    outcomes = []
    async with ctx["db"].acquire() as conn:
        for index, view in enumerate(views):
            await report_progress(ctx, index / len(views), f"refreshing {view}")
            outcomes.append(asdict(await refresh_view(conn, view)))
    return {"views": outcomes}


async def refresh_realtime_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, REALTIME_VIEWS)


async def refresh_daily_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, DAILY_VIEWS)


async def refresh_all_materialized_views(ctx: dict[str, Any]) -> dict[str, Any]:
    return await _refresh(ctx, ALL_VIEWS)
