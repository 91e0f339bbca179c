"""Job-history housekeeping."""

from __future__ import annotations

from typing import Any

from db.queries.history import prune_job_runs


async def prune_job_history(ctx: dict[str, Any]) -> dict[str, Any]:
    days = ctx["settings"].job_history_days
    deleted = await prune_job_runs(ctx["db"], days)
    return {"deleted": deleted, "older_than_days": days}
