"""Job progress: a job reports a fraction and a message; status readers see it while the job runs."""

from __future__ import annotations

import json
from typing import Any

from worker.jobstore import progress_key


async def report_progress(ctx: dict[str, Any], fraction: float, message: str = "") -> None:
    job_id = ctx.get("job_id")
    if job_id is None:  # called outside a worker (a test, a script): nothing to report to
        return
    value = {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "message": message}
    await ctx["redis"].set(progress_key(job_id), json.dumps(value), px=24 * 3600 * 1000)
