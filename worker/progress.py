"""Job progress: a job reports a fraction and a message; status readers see it while the job runs."""

from __future__ import annotations

import logging
from typing import Any

from worker.jobstore import set_progress
from worker.records import Progress

logger = logging.getLogger("salesdash.worker")


async def report_progress(ctx: dict[str, Any], fraction: float, message: str = "") -> bool:
    """Show the running job's progress. False when nothing was written: called outside a try of our worker, or
    this try lost its lease (another try owns the job now; its progress is not ours to overwrite)."""
    job_id = ctx.get("job_id")
    if job_id is None or "lease" not in ctx:  # called outside our worker (a test, a script): nothing to report to
        return False
    progress = Progress(fraction=round(min(max(fraction, 0.0), 1.0), 4), message=message)
    if await set_progress(ctx["redis"], job_id, ctx["queue"], ctx["lease"], progress):
        return True
    logger.warning(
        "progress write fenced: this try lost its lease to another",
        extra={"job_id": job_id, "queue": ctx["queue"], "lease": ctx["lease"]},
    )
    return False
