"""The `maintenance` queue: `arq worker.maintenance.Settings` starts a worker for it alone."""

from __future__ import annotations

from salesdash.config import get_settings
from salesdash.connections import redis_settings as _redis_settings
from worker import context
from worker.engine import SalesdashWorker as _Engine  # noqa: F401  (importing it installs our job loop)
from worker.registry import Queue, tasks_for

_TASKS = tasks_for(Queue.MAINTENANCE)


class Settings:
    """arq reads only this class's own attributes (no base class), so every setting is spelled out here."""

    queue_name = Queue.MAINTENANCE.redis_key
    functions = [spec.arq_function() for spec in _TASKS]
    cron_jobs = [spec.arq_cron() for spec in _TASKS if spec.schedule]
    redis_settings = _redis_settings()
    timezone = get_settings().tzinfo
    on_startup = context.startup
    on_shutdown = context.shutdown
    job_serializer = context.serialize_json
    job_deserializer = context.deserialize_json
    max_jobs = 20
    job_completion_wait = get_settings().shutdown_timeout
    keep_result = 24 * 3600
    health_check_interval = 30
