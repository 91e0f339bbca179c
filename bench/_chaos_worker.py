"""Worker settings for bench/chaos.py (`python -m arq bench._chaos_worker.Settings`): five kinds of task on a queue
of their own. Every run appends `<unix time> <job id> start|done` to runs-<pid>.log in $CHAOS_RUNS_DIR, so the
bench can count how many times each job really ran, whatever Redis kept."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from arq import func

from salesdash.config import get_settings
from salesdash.connections import LazyRedisSettings
from worker import context
from worker.engine import install_engine
from worker.registry import RetryPolicy

QUEUE_NAME = "salesdash:queue:chaos"
KEEP_RESULT_S = 5  # results expire soon, so the bench can see Redis back at its baseline


def _note(ctx: dict[str, Any], event: str) -> None:
    runs = Path(os.environ["CHAOS_RUNS_DIR"]) / f"runs-{os.getpid()}.log"
    with runs.open("a") as f:
        f.write(f"{time.time():.3f} {ctx['job_id']} {event}\n")


async def fast(ctx: dict[str, Any], n: int) -> int:
    _note(ctx, "start")
    _note(ctx, "done")
    return n


async def slow(ctx: dict[str, Any], seconds: float) -> float:
    _note(ctx, "start")
    await asyncio.sleep(seconds)
    _note(ctx, "done")
    return seconds


async def broken(ctx: dict[str, Any]) -> None:
    _note(ctx, "start")
    raise ValueError("bad input: this job fails by its own fault")


async def flaky(ctx: dict[str, Any], failures: int) -> int:
    """Fails `failures` times with a transient fault, then succeeds: a retrying job."""
    _note(ctx, "start")
    if ctx["job_try"] <= failures:
        raise ConnectionError(f"transient fault on try {ctx['job_try']}")
    _note(ctx, "done")
    return int(ctx["job_try"])


async def dbread(ctx: dict[str, Any]) -> int:
    """Needs PostgreSQL (which the bench restarts)."""
    _note(ctx, "start")
    count = await ctx["db"].fetchval("SELECT count(*) FROM job_runs WHERE job_id = $1", ctx["job_id"])
    _note(ctx, "done")
    return int(count)


install_engine()


class Settings:
    queue_name = QUEUE_NAME
    functions = [
        func(fast, name="fast"),
        func(slow, name="slow", timeout=60),
        func(broken, name="broken"),
        func(flaky, name="flaky"),
        # 3 tries: a PostgreSQL restart is waited out without spending them (worker/retry.py), so none fails
        func(dbread, name="dbread", max_tries=3),
    ]
    redis_settings = LazyRedisSettings()
    on_startup = context.startup
    on_shutdown = context.shutdown
    ctx = {"retry_policies": {"flaky": RetryPolicy(max_tries=30, backoff_base_s=0.2, backoff_cap_s=1)}}
    max_tries = 30  # tries lost with killed workers count too: a job in flight at several kills must not run out
    max_jobs = 20
    keep_result = KEEP_RESULT_S
    job_timeout = 60
    health_check_interval = 30
    timezone = get_settings().tzinfo
