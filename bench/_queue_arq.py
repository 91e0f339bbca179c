"""Bench worker settings for plain arq 0.28: `arq bench._queue_arq.DefaultSettings` (arq's defaults: max_jobs=10,
poll_delay=0.5 s) or `bench._queue_arq.TunedSettings` (max_jobs=100, poll_delay=0.01 s). Driven by bench/queue.py.

Nothing here may import `worker.*`: importing worker.engine would swap arq's Worker for ours. `on_startup`
refuses to run if that happened anyway, so a mix-up fails loudly instead of benchmarking the wrong loop.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import arq.worker
from arq.connections import RedisSettings

QUEUE_NAME = "arq:benchq"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

# `arq --custom-log-dict bench._queue_arq.QUIET_LOG` when the bench runs with --log-level WARNING
QUIET_LOG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq.standard": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq.standard"], "level": "WARNING"}},
}


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def ping(ctx: dict[str, Any]) -> None:
    return None


async def _startup(ctx: dict[str, Any]) -> None:
    if "worker.engine" in sys.modules or arq.worker.Worker.__module__ != "arq.worker":
        raise RuntimeError("plain-arq bench worker imported worker.engine: it would run our loop, not arq's")


class DefaultSettings:
    queue_name = QUEUE_NAME
    functions = [noop, ping]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    on_startup = _startup


class TunedSettings:
    queue_name = QUEUE_NAME
    functions = [noop, ping]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    on_startup = _startup
    max_jobs = 100
    poll_delay = 0.01
