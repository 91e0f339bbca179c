"""A queue's arq `Settings`, built from the task table and the functions its module binds."""

from __future__ import annotations

from typing import Any

from salesdash.config import get_settings
from salesdash.connections import LazyRedisSettings
from worker import context
from worker.jobstore import deserialize_json, serialize_json
from worker.registry import JobFunction, Queue, tasks_for

MAX_JOBS = 20
HEALTH_CHECK_INTERVAL_S = 30
KEEP_RESULT_S = 24 * 3600


def queue_settings(queue: Queue, *functions: JobFunction) -> type[Any]:
    """`Settings` for `arq worker.<queue>.Settings`: exactly the queue's tasks, bound to `functions` by name.
    A class with every attribute its own, since arq reads only a Settings class's own attributes."""
    specs = tasks_for(queue)
    bound = {f.__name__: f for f in functions}
    declared = {s.name for s in specs}
    if set(bound) != declared:
        raise LookupError(
            f"queue {queue.value}: functions {sorted(bound)} do not match its tasks in "
            f"worker/registry.py {sorted(declared)}"
        )
    config = get_settings()  # reads the environment only; no connection is opened here
    attrs: dict[str, Any] = {
        "__doc__": f"The `{queue.value}` queue's worker: `arq worker.{queue.value}.Settings`.",
        "queue_name": queue.queue_name,
        "functions": [spec.arq_function(bound[spec.name]) for spec in specs],
        "cron_jobs": [spec.arq_cron(bound[spec.name]) for spec in specs if spec.schedule],
        "redis_settings": LazyRedisSettings(),
        "timezone": config.tzinfo,
        "on_startup": context.startup,
        "on_shutdown": context.shutdown,
        "job_serializer": serialize_json,
        "job_deserializer": deserialize_json,
        "max_jobs": MAX_JOBS,
        "keep_result": KEEP_RESULT_S,  # for what no task declares: a refused payload's record
        "job_completion_wait": config.shutdown_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    return type("Settings", (), attrs)
