"""The one task registry: name → queue, function, argument model, scope, time limit, retry policy, schedule.

The API and the CLI enqueue by name through this table; each queue's `Settings` registers exactly the tasks
whose `queue` is its own (tests/test_registry.py holds that invariant).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from arq import cron, func
from arq.cron import CronJob
from arq.worker import Function
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.jobs import history, stock, views


class Queue(StrEnum):
    ANALYTICS = "analytics"
    MAINTENANCE = "maintenance"
    NOTIFICATIONS = "notifications"

    @property
    def redis_key(self) -> str:
        """The ready-jobs sorted set, which arq also treats as the worker's `queue_name`."""
        return f"salesdash:queue:{self.value}"


class Scope(StrEnum):
    READ = "read"
    TRIGGER = "trigger"
    ADMIN = "admin"


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient faults: delay = uniform(0, min(cap, base·2^(try-1)))."""

    max_tries: int = 3
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 300.0


@dataclass(frozen=True)
class Schedule:
    """An arq cron schedule plus its human description (CONTRACT §3)."""

    text: str
    minute: set[int] | int | None = None
    hour: set[int] | int | None = None
    day: set[int] | int | None = None
    weekday: set[int] | int | str | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: Queue
    function: Callable[..., Awaitable[Any]]
    description: str
    args_model: type[BaseModel] = NoArgs
    scope: Scope = Scope.TRIGGER
    timeout_s: float = 300
    keep_result_s: float = 24 * 3600
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    schedule: Schedule | None = None

    def validate(self, args: list[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Bind positional args to the model's fields in order, validate, return JSON-ready kwargs."""
        fields = list(self.args_model.model_fields)
        if len(args) > len(fields):
            raise TaskArgumentError(f"{self.name} takes at most {len(fields)} positional arguments, got {len(args)}")
        bound = dict(zip(fields, args, strict=False))
        duplicated = sorted(set(bound) & set(kwargs))
        if duplicated:
            raise TaskArgumentError(f"{self.name}: argument {duplicated[0]!r} given both positionally and by name")
        try:
            model = self.args_model.model_validate({**bound, **kwargs})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            raise TaskArgumentError(f"bad arguments for {self.name}: {problems}") from None
        return model.model_dump(mode="json")

    def arq_function(self) -> Function:
        coroutine: Any = self.function  # arq's WorkerCoroutine protocol is narrower than our callables
        return func(coroutine, name=self.name, timeout=self.timeout_s, max_tries=self.retry.max_tries,
                    keep_result=self.keep_result_s)

    def arq_cron(self) -> CronJob:
        assert self.schedule is not None
        s = self.schedule
        coroutine: Any = self.function
        weekday: Any = s.weekday
        return cron(coroutine, name=self.name, minute=s.minute, hour=s.hour, day=s.day, weekday=weekday,
                    timeout=self.timeout_s, max_tries=self.retry.max_tries, keep_result=self.keep_result_s)


class TaskArgumentError(ValueError):
    """Arguments that can never satisfy the task: rejected before anything is enqueued."""


class UnknownTaskError(KeyError):
    def __str__(self) -> str:
        known = ", ".join(sorted(TASKS))
        return f"unknown task {self.args[0]!r}; known tasks: {known}"


EVERY_5_MIN = set(range(0, 60, 5))
EVERY_2_MIN = set(range(0, 60, 2))

_SPECS = [
    TaskSpec("refresh_realtime_materialized_views", Queue.ANALYTICS, views.refresh_realtime_materialized_views,
             "Refresh the hourly sales metrics view", timeout_s=240,
             schedule=Schedule("every 5 min (minute 0,5,…,55)", minute=EVERY_5_MIN)),
    TaskSpec("refresh_daily_materialized_views", Queue.ANALYTICS, views.refresh_daily_materialized_views,
             "Refresh the daily sales, product and category views", timeout_s=1800,
             schedule=Schedule("every hour (minute 0)", minute=0)),
    TaskSpec("refresh_all_materialized_views", Queue.ANALYTICS, views.refresh_all_materialized_views,
             "Refresh every analytics view", timeout_s=3600),
    TaskSpec("check_low_stock_products", Queue.NOTIFICATIONS, stock.check_low_stock_products,
             "Record a low-stock alert for products at or under their reorder point", timeout_s=300,
             schedule=Schedule("daily @ 09:00", minute=0, hour=9)),
    TaskSpec("prune_job_history", Queue.MAINTENANCE, history.prune_job_history,
             "Delete job_runs rows older than SALESDASH_JOB_HISTORY_DAYS", timeout_s=600,
             schedule=Schedule("daily @ 01:30", minute=30, hour=1)),
]

TASKS: Final[Mapping[str, TaskSpec]] = {spec.name: spec for spec in _SPECS}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(name) from None


def tasks_for(queue: Queue) -> list[TaskSpec]:
    return [spec for spec in _SPECS if spec.queue is queue]
