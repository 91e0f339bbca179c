"""Job progress: a job reports a fraction and a message; status readers see it while the job runs."""

from __future__ import annotations

from typing import Any

from worker.jobstore import set_progress
from worker.records import Progress


async def report_progress(ctx: dict[str, Any], fraction: float, message: str = "") -> None:
    job_id = ctx.get("job_id")
    if job_id is None:  # called outside a worker (a test, a script): nothing to report to
        return
    await set_progress(ctx["redis"], job_id, Progress(fraction=round(min(max(fraction, 0.0), 1.0), 4), message=message))
