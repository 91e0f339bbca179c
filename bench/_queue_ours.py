"""Bench worker settings for our engine (`SalesdashWorker`): `arq bench._queue_ours.Settings` (max_jobs=20, like
our real queues) or `bench._queue_ours.Settings100` (max_jobs=100). Driven by bench/queue.py.

Shaped like worker/analytics.py: the PostgreSQL pool comes from `worker.context.startup`, so job history is
written to `job_runs` and metrics to the `salesdash:metrics` hash, exactly as in production. `noop` is the task
the drain measures; `ping` (identical) is used for warm-up and round trips so the drain's history and metrics
counts stay exact.
"""

from __future__ import annotations

from typing import Any

from salesdash.config import get_settings
from salesdash.connections import LazyRedisSettings
from worker import context
from worker.engine import install_engine
from worker.jobstore import deserialize_json, queue_name, serialize_json

install_engine()

QUEUE = "bench"
QUEUE_NAME = queue_name(QUEUE)


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def ping(ctx: dict[str, Any]) -> None:
    return None


def _settings(max_jobs: int) -> dict[str, Any]:
    # arq reads only a Settings class's own attributes (no base class), so each class gets the full set
    return {
        "__doc__": f"Our worker on the bench queue, max_jobs={max_jobs}.",
        "queue_name": QUEUE_NAME,
        "functions": [noop, ping],
        "redis_settings": LazyRedisSettings(),
        "timezone": get_settings().tzinfo,
        "on_startup": context.startup,
        "on_shutdown": context.shutdown,
        "job_serializer": serialize_json,
        "job_deserializer": deserialize_json,
        "max_jobs": max_jobs,
        "job_completion_wait": 5,
        "keep_result": 3600,
        "health_check_interval": 30,
    }


Settings = type("Settings", (), _settings(20))
Settings100 = type("Settings100", (), _settings(100))
