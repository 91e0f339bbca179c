"""The task table: every task's name, queue, domain, argument model, scope, time limit, retry policy, result
expiry and schedule. Declarations only: it imports no job code, so the API and the CLI can validate and enqueue
by name without loading any job module; each queue's `Settings` binds the functions (`worker/<queue>.py`).

A task is a slice named by its `domain`: its coroutine in `worker/jobs/<domain>.py`, its SQL in
`db/queries/<domain>.py`, its tests in `tests/test_<domain>.py` (tests/test_registry.py holds that layout).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from arq import cron, func
from arq.cron import CronJob
from arq.worker import Function
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from salesdash.auth import Scope
from salesdash.config import get_settings
from salesdash.periods import Month, iso_week, parse_iso_week
from worker.jobstore import queue_name

JobFunction = Callable[..., Awaitable[Any]]


class Queue(StrEnum):
    ANALYTICS = "analytics"
    MAINTENANCE = "maintenance"
    NOTIFICATIONS = "notifications"

    @property
    def queue_name(self) -> str:
        """arq's `queue_name`: `Settings.queue_name`, and `_queue_name` for arq's `enqueue_job`."""
        return queue_name(self.value)


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MonthlyReportArgs(BaseModel):
    """`month` as YYYY-MM, not after the current month in SALESDASH_TIMEZONE; absent: the previous month."""

    model_config = ConfigDict(extra="forbid")
    month: str | None = None

    @field_validator("month")
    @classmethod
    def _past_or_current_month(cls, value: str | None) -> str | None:
        if value is None:
            return None
        month, tz = Month.parse(value), get_settings().tzinfo
        if month > Month.current(tz):
            raise ValueError(f"{month} is in the future (it is {Month.current(tz)} in {tz.key})")
        return str(month)


class LifetimeValuesArgs(BaseModel):
    """`as_of`: the local day (SALESDASH_TIMEZONE) whose end the values are computed as of, not after today; absent
    (as the schedule does): today."""

    model_config = ConfigDict(extra="forbid")
    as_of: date | None = None

    @field_validator("as_of")
    @classmethod
    def _not_in_the_future(cls, value: date | None) -> date | None:
        tz = get_settings().tzinfo
        today = datetime.now(tz).date()
        if value is not None and value > today:
            raise ValueError(f"{value} is in the future (it is {today} in {tz.key})")
        return value


class LowStockArgs(LifetimeValuesArgs):
    """`as_of`: the local day whose morning the check runs as of (demand of the 28 days before it), not after today;
    absent (as the schedule does): today."""


class DailySummaryArgs(BaseModel):
    """`day`: a finished local day (SALESDASH_TIMEZONE); absent (as the schedule does): yesterday."""

    model_config = ConfigDict(extra="forbid")
    day: date | None = None

    @field_validator("day")
    @classmethod
    def _finished(cls, value: date | None) -> date | None:
        tz = get_settings().tzinfo
        today = datetime.now(tz).date()
        if value is not None and value >= today:
            raise ValueError(f"{value} has not ended yet (it is {today} in {tz.key})")
        return value


class WeeklyReportArgs(BaseModel):
    """`week`: a finished ISO week as YYYY-Www (SALESDASH_TIMEZONE); absent (as the schedule does): the previous one."""

    model_config = ConfigDict(extra="forbid")
    week: str | None = None

    @field_validator("week")
    @classmethod
    def _finished(cls, value: str | None) -> str | None:
        if value is None:
            return None
        monday, tz = parse_iso_week(value), get_settings().tzinfo
        today = datetime.now(tz).date()
        if monday + timedelta(days=7) > today:
            raise ValueError(f"{iso_week(monday)} has not ended yet (it is {iso_week(today)} in {tz.key})")
        return iso_week(monday)


ExportFormat = Literal["json", "csv", "parquet"]
PARQUET_INSTALL = "pip install 'salesdash[parquet]'"


def parquet_available() -> bool:
    """Parquet needs the optional `pyarrow` (the `parquet` extra); looked up without importing it."""
    return importlib.util.find_spec("pyarrow") is not None


def _local_instant(value: Any) -> Any:
    """An ISO 8601 date or datetime as an aware datetime: a date is local midnight and a datetime without an
    offset is local time, local meaning SALESDASH_TIMEZONE."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date or datetime: {value!r}") from None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=get_settings().tzinfo)
    if isinstance(value, date):
        return datetime.combine(value, time(), get_settings().tzinfo)
    raise ValueError(f"expected an ISO 8601 date or datetime string, got {value!r}")


LocalInstant = Annotated[datetime, BeforeValidator(_local_instant)]


class ExportArgs(BaseModel):
    """`export_analytics_data`: the orders created in [start_date, end_date), as NDJSON, CSV or Parquet."""

    model_config = ConfigDict(extra="forbid")
    start_date: LocalInstant
    end_date: LocalInstant
    export_format: ExportFormat = "json"

    @field_validator("end_date")
    @classmethod
    def _range(cls, end: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("start_date")
        if start is None:  # start_date was refused already, and says so
            return end
        if end <= start:
            raise ValueError(f"must be after start_date ({start.isoformat()}): the range is [start_date, end_date)")
        max_days = get_settings().export_max_days
        if end - start > timedelta(days=max_days):
            days = (end - start) / timedelta(days=1)
            raise ValueError(f"the range spans {days:g} days, more than SALESDASH_EXPORT_MAX_DAYS ({max_days})")
        return end

    @field_validator("export_format")
    @classmethod
    def _installed(cls, export_format: ExportFormat) -> ExportFormat:
        if export_format == "parquet" and not parquet_available():
            raise ValueError(f"parquet needs the optional pyarrow package: {PARQUET_INSTALL}")
        return export_format


class CleanPartitionsArgs(BaseModel):
    """`clean_old_order_partitions`: `dry_run` reports what would go and changes nothing; `retention_months`
    overrides SALESDASH_ORDER_RETENTION_MONTHS for this run (at least 3: the current month is never at stake)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    dry_run: bool = False
    retention_months: int | None = Field(default=None, ge=3, le=1200)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient faults (worker/retry.py)."""

    max_tries: int = 3
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 300.0


@dataclass(frozen=True)
class Schedule:
    """An arq cron schedule plus its human description (README, `GET /tasks`)."""

    text: str
    minute: set[int] | int | None = None
    hour: set[int] | int | None = None
    day: set[int] | int | None = None
    weekday: set[int] | int | str | None = None


class TaskArgumentError(ValueError):
    """Arguments that can never satisfy the task: refused before anything is enqueued."""


class UnknownTaskError(KeyError):
    def __str__(self) -> str:
        return f"unknown task {self.args[0]!r}; known tasks: {', '.join(sorted(TASKS))}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: Queue
    domain: str
    description: str
    args_model: type[BaseModel] = NoArgs
    scope: Scope = Scope.TRIGGER
    timeout_s: float = 300
    keep_result_s: float = 24 * 3600
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    schedule: Schedule | None = None

    def validate(self, args: list[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Bind positional args to the model's fields in order and validate; returns JSON-ready kwargs."""
        return self._model(args, kwargs).model_dump(mode="json")

    def bind(self, args: list[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The same check, returning the values the job function receives (dates as `date`, ...)."""
        model = self._model(args, kwargs)
        return {name: getattr(model, name) for name in type(model).model_fields}

    def _model(self, args: list[Any], kwargs: Mapping[str, Any]) -> BaseModel:
        fields = list(self.args_model.model_fields)
        if len(args) > len(fields):
            raise TaskArgumentError(f"{self.name} takes at most {len(fields)} positional arguments, got {len(args)}")
        bound = dict(zip(fields, args, strict=False))
        duplicated = sorted(set(bound) & set(kwargs))
        if duplicated:
            raise TaskArgumentError(f"{self.name}: argument {duplicated[0]!r} given both positionally and by name")
        try:
            return self.args_model.model_validate({**bound, **kwargs})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            raise TaskArgumentError(f"bad arguments for {self.name}: {problems}") from None

    def arq_function(self, coroutine: JobFunction) -> Function:
        job: Any = coroutine  # arq's WorkerCoroutine protocol is narrower than our callables
        return func(
            job, name=self.name, timeout=self.timeout_s, max_tries=self.retry.max_tries, keep_result=self.keep_result_s
        )

    def arq_cron(self, coroutine: JobFunction) -> CronJob:
        if self.schedule is None:
            raise ValueError(f"{self.name} has no schedule")
        s = self.schedule
        job: Any = coroutine  # as above
        weekday: Any = s.weekday  # arq types it as a literal day name or number; ours is the same set
        return cron(
            job,
            name=self.name,
            minute=s.minute,
            hour=s.hour,
            day=s.day,
            weekday=weekday,
            timeout=self.timeout_s,
            max_tries=self.retry.max_tries,
            keep_result=self.keep_result_s,
        )


EVERY_MINUTE = set(range(60))
EVERY_2_MIN = set(range(0, 60, 2))
EVERY_5_MIN = set(range(0, 60, 5))
EVERY_10_MIN = set(range(0, 60, 10))

_SPECS = [
    TaskSpec(
        "refresh_realtime_materialized_views",
        Queue.ANALYTICS,
        "views",
        "Bring the hourly sales rollup up to date: recompute the UTC hours whose orders changed",
        timeout_s=240,
        schedule=Schedule("every 5 min (minute 0,5,…,55)", minute=EVERY_5_MIN),
    ),
    TaskSpec(
        "refresh_daily_materialized_views",
        Queue.ANALYTICS,
        "views",
        "Bring the daily sales, product and category rollups up to date: recompute the local days that changed",
        timeout_s=1800,
        schedule=Schedule("every hour (minute 0)", minute=0),
    ),
    TaskSpec(
        "refresh_all_materialized_views",
        Queue.ANALYTICS,
        "views",
        "Rebuild every analytics rollup from orders (repair) and clear the invalidation log",
        timeout_s=3600,
    ),
    TaskSpec(
        "warm_dashboard_cache",
        Queue.ANALYTICS,
        "dashboard",
        "Compute every default dashboard payload into the Redis cache",
        timeout_s=100,  # under the 2 min interval, so two runs never overlap
        keep_result_s=3600,  # 30 runs an hour: an hour of results is enough to see what happened
        retry=RetryPolicy(max_tries=2, backoff_cap_s=30),  # the next tick comes 2 min later anyway
        schedule=Schedule("every 2 min (minute 0,2,…,58)", minute=EVERY_2_MIN),
    ),
    TaskSpec(
        "generate_monthly_report",
        Queue.ANALYTICS,
        "reports",
        "Store the sales report of a month (default: the previous one) as JSON and an HTML page",
        args_model=MonthlyReportArgs,
        timeout_s=1800,
        keep_result_s=7 * 24 * 3600,
        schedule=Schedule("monthly, day 1 @ 06:00", minute=0, hour=6, day=1),
    ),
    TaskSpec(
        "check_low_stock_products",
        Queue.NOTIFICATIONS,
        "stock",
        "Alert once per crossing (one digest per run) on products at or under their demand-based reorder point "
        "(28 days of demand, SALESDASH_LOW_STOCK_SERVICE_LEVEL) or under their fixed threshold",
        args_model=LowStockArgs,
        timeout_s=300,
        schedule=Schedule("daily @ 09:00", minute=0, hour=9),
    ),
    TaskSpec(
        "send_daily_summary",
        Queue.NOTIFICATIONS,
        "summaries",
        "Send yesterday's figures (a local day) against the same weekday last week and the trailing 7-day average",
        args_model=DailySummaryArgs,
        timeout_s=300,
        schedule=Schedule("daily @ 08:00", minute=0, hour=8),
    ),
    TaskSpec(
        "weekly_performance_report",
        Queue.NOTIFICATIONS,
        "summaries",
        "Store and send the previous ISO week's report: week over week, year over year, daily trend, movers, segments",
        args_model=WeeklyReportArgs,
        timeout_s=1800,
        keep_result_s=7 * 24 * 3600,
        schedule=Schedule("weekly, Monday @ 08:00", minute=0, hour=8, weekday="mon"),
    ),
    TaskSpec(
        "check_alerts",
        Queue.NOTIFICATIONS,
        "alerts",
        "Alert on failed-job rates, waiting jobs, stale rollups and queues without a worker; cooldown, then resolved",
        timeout_s=60,
        keep_result_s=3600,
        retry=RetryPolicy(max_tries=2, backoff_cap_s=30),  # the next run is 5 min later anyway
        schedule=Schedule("every 5 min (minute 0,5,…,55)", minute=EVERY_5_MIN),
    ),
    TaskSpec(
        "deliver_notifications",
        Queue.NOTIFICATIONS,
        "notifications",
        "Send the notifications outbox's due deliveries (e-mail and webhooks), retrying failed ones with backoff",
        timeout_s=240,
        keep_result_s=3600,
        retry=RetryPolicy(max_tries=1),  # the next run is a minute later and retries what is due
        schedule=Schedule("every minute", minute=EVERY_MINUTE),
    ),
    TaskSpec(
        "prune_job_history",
        Queue.MAINTENANCE,
        "history",
        "Delete job_runs rows older than SALESDASH_JOB_HISTORY_DAYS",
        scope=Scope.ADMIN,
        timeout_s=600,
        schedule=Schedule("daily @ 01:30", minute=30, hour=1),
    ),
    TaskSpec(
        "export_analytics_data",
        Queue.ANALYTICS,
        "exports",
        "Export the orders created in [start_date, end_date) to a file (NDJSON, CSV or Parquet)",
        args_model=ExportArgs,
        timeout_s=3600,
    ),
    TaskSpec(
        "prune_exports",
        Queue.MAINTENANCE,
        "exports",
        "Delete export files older than SALESDASH_EXPORT_RETENTION_DAYS, and abandoned partial ones",
        scope=Scope.ADMIN,
        timeout_s=600,
        schedule=Schedule("daily @ 01:45", minute=45, hour=1),
    ),
    TaskSpec(
        "update_customer_segments",
        Queue.MAINTENANCE,
        "segments",
        "Score every customer's recency, frequency and monetary value (1-5) over SALESDASH_RFM_WINDOW_DAYS and map "
        "them to a segment through segment_grid; writes and logs only the changes",
        timeout_s=1800,
        schedule=Schedule("daily @ 02:00", minute=0, hour=2),
    ),
    TaskSpec(
        "clean_old_order_partitions",
        Queue.MAINTENANCE,
        "partitions",
        "Drop the monthly order partitions wholly older than SALESDASH_ORDER_RETENTION_MONTHS (detach concurrently, "
        "then drop) and create the next three months' partitions",
        args_model=CleanPartitionsArgs,
        scope=Scope.ADMIN,
        timeout_s=3600,
        keep_result_s=7 * 24 * 3600,
        schedule=Schedule("weekly, Sunday @ 04:00", minute=0, hour=4, weekday="sun"),
    ),
    TaskSpec(
        "create_order_partitions",
        Queue.MAINTENANCE,
        "partitions",
        "Create the monthly order partitions of the current month and the next three where missing",
        timeout_s=300,
        schedule=Schedule("daily @ 00:45", minute=45, hour=0),
    ),
    TaskSpec(
        "prune_old_records",
        Queue.MAINTENANCE,
        "retention",
        "Delete old reports, sent notifications and segment history in bounded batches (SALESDASH_*_RETENTION_DAYS)",
        scope=Scope.ADMIN,
        timeout_s=1800,
        schedule=Schedule("daily @ 01:15", minute=15, hour=1),
    ),
    TaskSpec(
        "update_customer_lifetime_values",
        Queue.MAINTENANCE,
        "lifetime_values",
        "Write every customer's revenue to date and predicted 12-month value (BG/NBD x Gamma-Gamma, refitted daily)",
        args_model=LifetimeValuesArgs,
        timeout_s=1800,
        schedule=Schedule("daily @ 03:00", minute=0, hour=3),
    ),
    TaskSpec(
        "check_system_health",
        Queue.MAINTENANCE,
        "health",
        "Check PostgreSQL, Redis, partitions, rollups and queues; gauges at /metrics, a notification per failing check",
        timeout_s=60,
        retry=RetryPolicy(max_tries=2, backoff_cap_s=30),  # the next run is 10 min later anyway
        schedule=Schedule("every 10 min (minute 0,10,…,50)", minute=EVERY_10_MIN),
    ),
]

TASKS: Final[Mapping[str, TaskSpec]] = {spec.name: spec for spec in _SPECS}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(name) from None


def tasks_for(queue: Queue | str) -> list[TaskSpec]:
    return [spec for spec in _SPECS if spec.queue == queue]
