"""Customer segmentation: RFM scores and the R×F grid's segments (db/queries/segments.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from db.queries.segments import segment_counts, update_segments
from worker.progress import report_progress


async def update_customer_segments(ctx: dict[str, Any]) -> dict[str, Any]:
    settings = ctx["settings"]
    as_of = datetime.now(UTC)
    result: dict[str, Any] = {"as_of": as_of.isoformat(), "window_days": settings.rfm_window_days}
    await report_progress(ctx, 0.0, f"scoring the purchases of the last {settings.rfm_window_days} days")
    async with ctx["db"].acquire() as conn:
        run = await update_segments(conn, as_of=as_of, window_days=settings.rfm_window_days, timezone=settings.timezone)
        if run is None:
            return {**result, "skipped": True, "reason": "another update_customer_segments run holds the lock"}
        await report_progress(ctx, 0.9, "counting customers per segment")
        counts = await segment_counts(conn)
    return {
        **result,
        "skipped": False,
        "scored": run.scored,
        "changed": run.changed,
        "history_rows": run.history_rows,
        "segments": counts,
    }
