"""Worker settings with test tasks for the job-platform tests (`arq tests.platform_worker.Settings`)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import asyncpg
from arq import cron, func

from salesdash.config import get_settings
from salesdash.connections import LazyRedisSettings
from worker import context
from worker.engine import install_engine
from worker.progress import report_progress
from worker.registry import RetryPolicy


async def record(ctx: dict[str, Any], tag: str) -> str:
    await ctx["redis"].rpush("test:order", tag)
    return tag


async def sleep(ctx: dict[str, Any], seconds: float, tag: str = "") -> dict[str, Any]:
    await ctx["redis"].rpush("test:started", f"{tag}|{os.getpid()}|{ctx['worker_id']}")
    await asyncio.sleep(seconds)
    return {"slept": seconds, "pid": os.getpid()}


async def flaky(ctx: dict[str, Any], key: str, failures: int) -> int:
    attempt = int(await ctx["redis"].incr(key))
    if attempt <= failures:
        raise ConnectionError(f"transient fault on attempt {attempt}")
    return attempt


async def broken(ctx: dict[str, Any]) -> None:
    raise ValueError("bad input for broken")


async def hang(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(3600)


async def halfway(ctx: dict[str, Any], release_key: str) -> str:
    await report_progress(ctx, 0.5, "half way")
    while not await ctx["redis"].exists(release_key):
        await asyncio.sleep(0.05)
    return "done"


async def tick(ctx: dict[str, Any]) -> None:
    await ctx["redis"].incr(f"test:tick:{ctx['job_id']}")


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def needs_db(ctx: dict[str, Any], tag: str, pause: float = 0.0) -> str:
    """A job that needs PostgreSQL: a pause (so it is running when the server goes), then a query."""
    await ctx["redis"].rpush("test:started", f"{tag}|{os.getpid()}|{ctx['worker_id']}")
    await asyncio.sleep(pause)
    async with ctx["db"].acquire() as conn:
        return str(await conn.fetchval("SELECT $1::text", tag))


async def needs_missing_db(ctx: dict[str, Any], port: int) -> None:
    """A job whose PostgreSQL never answers (nothing listens on `port`)."""
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=2)
    await conn.close()


install_engine()


def _functions() -> list[Any]:
    return [
        func(record, name="record"),
        func(sleep, name="sleep", timeout=120),
        func(flaky, name="flaky", max_tries=4),
        func(broken, name="broken", keep_result=3),
        func(hang, name="hang", timeout=1),
        func(halfway, name="halfway", timeout=60),
        func(noop, name="noop"),
        func(needs_db, name="needs_db", timeout=120),
        func(needs_missing_db, name="needs_missing_db", max_tries=2),
    ]


class Settings:
    queue_name = "salesdash:queue:platform"
    functions = _functions()
    redis_settings = LazyRedisSettings()
    on_startup = context.startup
    on_shutdown = context.shutdown
    ctx = {"retry_policies": {"flaky": RetryPolicy(max_tries=4, backoff_base_s=0.2, backoff_cap_s=0.5)}}
    max_jobs = int(os.environ.get("TEST_MAX_JOBS", "10"))
    job_completion_wait = int(os.environ.get("SALESDASH_SHUTDOWN_TIMEOUT", "3"))
    health_check_interval = 30
    timezone = get_settings().tzinfo


class CronSettings:
    queue_name = "salesdash:queue:platformcron"
    functions = [func(noop, name="noop")]
    cron_jobs = [cron(tick, name="tick", second=set(range(60)))]
    redis_settings = LazyRedisSettings()
    on_startup = context.startup
    on_shutdown = context.shutdown
    health_check_interval = 30


# ---- arq settings honoured by the engine (tests/test_platform_settings.py) ------------------------------------
def marked_serializer(value: dict[str, Any]) -> bytes:
    """A serializer of the user's own: JSON behind a marker, so a payload read any other way would fail."""
    return b"SD1" + json.dumps(value, default=str).encode()


def marked_deserializer(raw: bytes) -> Any:
    if not raw.startswith(b"SD1"):
        raise ValueError("payload lacks the SD1 marker")
    return json.loads(raw[3:])


async def _note(ctx: dict[str, Any], event: str) -> None:
    await ctx["redis"].rpush(f"test:hooks:{ctx['job_id']}", event)


async def on_job_start(ctx: dict[str, Any]) -> None:
    await _note(ctx, "start")


async def on_job_end(ctx: dict[str, Any]) -> None:
    await _note(ctx, "end")


async def after_job_end(ctx: dict[str, Any]) -> None:
    await _note(ctx, f"after:{await ctx['redis'].exists('arq:result:' + ctx['job_id'])}")


async def greet(ctx: dict[str, Any], name: str) -> str:
    await _note(ctx, "run")
    return f"hello {name}"


class HookSettings:
    queue_name = "salesdash:queue:hooks"
    functions = [greet, hang, flaky]  # plain coroutines: time limit, tries and expiry come from the settings
    redis_settings = LazyRedisSettings()
    on_job_start = on_job_start
    on_job_end = on_job_end
    after_job_end = after_job_end
    job_serializer = marked_serializer
    job_deserializer = marked_deserializer
    job_timeout = 1
    keep_result = 2
    max_tries = 2
    health_check_interval = 2
    max_jobs = 3


class RefusedSettings:
    queue_name = "salesdash:queue:refused"
    functions = [func(noop, name="noop")]
    redis_settings = LazyRedisSettings()
    poll_delay = 0.1  # arq's polling interval: the engine does not poll, so it must say so rather than ignore it
