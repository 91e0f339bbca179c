"""Dashboard cache warming."""

from __future__ import annotations

import time
from typing import Any

from worker import cache, dashboard
from worker.progress import report_progress


async def warm_dashboard_cache(ctx: dict[str, Any]) -> dict[str, Any]:
    """Compute every default dashboard payload from one snapshot and write them all in one MULTI/EXEC: a run
    that fails writes nothing, and a second run only rewrites the same keys."""
    started = time.perf_counter()
    settings = ctx["settings"]
    requests = dashboard.warm_requests(dashboard.Moment.current(settings.tzinfo))

    async def progress(fraction: float, message: str) -> None:
        await report_progress(ctx, 0.95 * fraction, message)

    entries = await dashboard.compute_all(ctx["db"], requests, progress)
    await report_progress(ctx, 0.95, f"storing {len(entries)} payloads")
    keys = await cache.store_all(ctx["redis"], entries, settings.dashboard_cache_ttl_s)
    for query in {e.query for e in entries}:
        await cache.record_computation(ctx["redis"], query, sum(e.query == query for e in entries))
    return {
        "payloads": len(keys),
        "ttl_s": settings.dashboard_cache_ttl_s,
        "data_watermark": entries[0].data_watermark if entries else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
