"""What the operators' monitoring page shows (`/dashboard`): queues with an hour of per-minute figures, workers
alive or gone, the schedule, a searchable job list, one job in detail and the trigger forms a principal may use.

It reads through the job service (worker.client), the job history and the Redis layout's readers; it changes
nothing. Who may see a traceback or a form is decided by salesdash.auth, here, once for every transport.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any

import asyncpg
from arq.utils import to_unix_ms
from pydantic import BaseModel
from redis.asyncio import Redis

from db.queries.history import get_job_run, job_tries, minute_stats, runs_by_id, search_job_runs
from salesdash.auth import Principal, Scope, scope_to_operate
from salesdash.config import get_settings
from worker import client
from worker import jobstore as js
from worker.records import JOB_STATES, JobStatus, TryInfo, WorkerInfo
from worker.registry import TASKS, TaskSpec
from worker.retry import dependency_down

WINDOW_MINUTES = 60
PAGE_SIZE = 25
SEARCH_WINDOW = timedelta(days=7)  # how far back a text search looks when no `since` is given


class MinutePoint(BaseModel):
    minute: datetime
    depth: int | None  # None: no worker of the queue looked in that minute
    finished: int
    failed: int
    p95_ms: float | None


class QueuePanel(BaseModel):
    name: str
    queued: int
    deferred: int
    in_progress: int
    workers: int
    oldest_wait_s: float | None  # how long the longest-waiting due job has waited
    minutes: list[MinutePoint]  # the last hour, oldest first


class WorkerRow(BaseModel):
    worker_id: str
    alive: bool
    last_seen: datetime
    info: WorkerInfo | None  # None once gone: only the registry's last-seen time is left


class ScheduleRow(BaseModel):
    task_name: str
    queue: str
    schedule: str
    next_run: datetime | None
    last_job_id: str | None
    last_status: str | None
    last_finished: datetime | None


class Overview(BaseModel):
    now: datetime
    queues: list[QueuePanel]
    workers: list[WorkerRow]
    schedule: list[ScheduleRow]


class JobRow(BaseModel):  # type: ignore[no-redef]  # the pydantic plugin trips on a field named kwargs
    status: JobStatus
    args: list[Any]
    kwargs: dict[str, Any]


class JobPage(BaseModel):
    jobs: list[JobRow]
    page: int
    has_more: bool


class JobDetail(BaseModel):  # type: ignore[no-redef]  # the pydantic plugin trips on a field named kwargs
    job: JobStatus  # its traceback only for admins
    args: list[Any]
    kwargs: dict[str, Any]
    duration_s: float | None
    traceback_hidden: bool  # there is one, and this principal may not see it
    can_abort: bool
    can_retry: bool
    # every try that ended, oldest first, as far as the history has been flushed; None while PostgreSQL is
    # unreachable (a live job's detail still answers from Redis)
    tries: list[TryInfo] | None = None


class TaskForm(BaseModel):
    name: str
    queue: str
    description: str
    scope: str
    schedule: str
    arguments: dict[str, Any]  # the argument model's JSON schema, the form is generated from it


@dataclass(frozen=True)
class JobFilter:
    task: str | None = None
    queue: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None
    page: int = 1

    def check(self) -> None:
        """ValueError naming the first filter no job can match."""
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.queue is not None and self.queue not in client.QUEUES:
            raise ValueError(f"unknown queue {self.queue!r}; queues: {', '.join(client.QUEUES)}")
        if self.status is not None and self.status not in JOB_STATES:
            raise ValueError(f"unknown status {self.status!r}; statuses: {', '.join(JOB_STATES)}")
        if self.since and self.until and self.until <= self.since:
            raise ValueError("until must be after since")
        if not 1 <= self.page <= 10_000:
            raise ValueError(f"page must be between 1 and 10000, got {self.page}")


# ---- queues, workers, schedule ---------------------------------------------------------------------------------
async def overview(redis: Redis, db: asyncpg.Pool) -> Overview:
    now = datetime.now(UTC)
    return Overview(
        now=now,
        queues=await queue_panels(redis, db, now),
        workers=await worker_rows(redis),
        schedule=await schedule_rows(db, now),
    )


async def queue_panels(redis: Redis, db: asyncpg.Pool, now: datetime) -> list[QueuePanel]:
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=WINDOW_MINUTES - 1)
    stats: dict[tuple[str, datetime], dict[str, Any]] = {
        (r["queue"], r["minute"]): r for r in await minute_stats(db, since)
    }
    panels = []
    for name, counts in (await client.queue_overview(redis)).items():
        minutes = []
        for minute_ms, depth in await js.depth_history(redis, name, WINDOW_MINUTES):
            minute = datetime.fromtimestamp(minute_ms / 1000, UTC)
            row = stats.get((name, minute), {})
            p95 = row.get("p95_ms")
            minutes.append(
                MinutePoint(
                    minute=minute,
                    depth=depth,
                    finished=row.get("finished", 0),
                    failed=row.get("failed", 0),
                    p95_ms=None if p95 is None else float(p95),
                )
            )
        oldest = await js.oldest_waiting_ms(redis, name)
        wait = None if oldest is None else max(0.0, (now.timestamp() * 1000 - oldest) / 1000)
        panels.append(QueuePanel(name=name, **counts, oldest_wait_s=wait, minutes=minutes))
    return panels


async def worker_rows(redis: Redis) -> list[WorkerRow]:
    """Live workers, then those seen in the last hour that stopped reporting without signing off."""
    alive = {w.worker_id: w for w in await client.workers(redis)}
    seen = await js.recent_workers(redis, js.now_ms() - WINDOW_MINUTES * 60_000)
    rows = [
        WorkerRow(
            worker_id=wid, alive=wid in alive, last_seen=datetime.fromtimestamp(ms / 1000, UTC), info=alive.get(wid)
        )
        for wid, ms in seen.items()
    ]
    return sorted(rows, key=lambda r: (not r.alive, r.info.queue if r.info else "", r.worker_id))


def next_run(spec: TaskSpec, after: datetime) -> datetime | None:
    """When the schedule fires next after `after`, by arq's own cron arithmetic in SALESDASH_TIMEZONE."""
    if spec.schedule is None:
        return None
    cron_job = spec.arq_cron(_never_called)
    cron_job.calculate_next(after.astimezone(get_settings().tzinfo))
    # arq fires at microsecond 123456 of the second (its own convention); the schedule's time is the second
    return cron_job.next_run.replace(microsecond=0) if cron_job.next_run else None


async def _never_called(ctx: dict[str, Any]) -> None:  # arq's CronJob wants a coroutine; only its times are used
    return None


_LOOKBACK = (timedelta(minutes=5), timedelta(hours=1), timedelta(hours=26), timedelta(days=8), timedelta(days=63))


def recent_ticks(spec: TaskSpec, now: datetime, count: int = 2) -> list[datetime]:
    """The schedule's last `count` ticks at or before `now`, newest first (arq's times, microsecond 123456 included,
    as the workers' cron job ids carry them). arq only counts forward, and slowly: the answer is kept until the
    schedule's next tick passes, which is when it changes."""
    upcoming = next_run(spec, now)
    return [] if upcoming is None else list(_ticks_before(spec.name, upcoming, get_settings().tzinfo, count))


@lru_cache(maxsize=256)
def _ticks_before(name: str, upcoming: datetime, tz: tzinfo, count: int) -> tuple[datetime, ...]:
    spec, ticks = TASKS[name], list[datetime]()
    for lookback in _LOOKBACK:  # an hour back first, then further, up to two months
        cron_job = spec.arq_cron(_never_called)
        cron_job.calculate_next((upcoming - lookback).astimezone(tz))
        ticks = list[datetime]()
        while cron_job.next_run is not None and cron_job.next_run < upcoming:
            ticks.append(cron_job.next_run)
            cron_job.calculate_next(cron_job.next_run)
        if len(ticks) >= count:
            break
    return tuple(ticks[::-1][:count])


def cron_job_id(spec: TaskSpec, tick: datetime) -> str:
    """The id a worker gives the job of a tick (worker/engine.py run_cron)."""
    return js.cron_job_id(spec.name, to_unix_ms(tick))


async def schedule_rows(db: asyncpg.Pool, now: datetime) -> list[ScheduleRow]:
    """Each scheduled task's next run, and the outcome of its latest recorded tick among the last two (found by the
    ticks' job ids, so the lookup costs two primary-key probes a task however long the history is)."""
    scheduled = [s for s in TASKS.values() if s.schedule is not None]
    ids = {spec.name: [cron_job_id(spec, t) for t in recent_ticks(spec, now)] for spec in scheduled}
    runs = await runs_by_id(db, [i for task_ids in ids.values() for i in task_ids])
    rows = []
    for spec in scheduled:
        run = next((runs[i] for i in ids[spec.name] if i in runs), {})
        rows.append(
            ScheduleRow(
                task_name=spec.name,
                queue=spec.queue.value,
                schedule=spec.schedule.text if spec.schedule else "",
                next_run=next_run(spec, now),
                last_job_id=run.get("job_id"),
                last_status=run.get("status"),
                last_finished=run.get("finished_at"),
            )
        )
    return sorted(rows, key=lambda r: (r.next_run or now, r.task_name))


# ---- jobs --------------------------------------------------------------------------------------------------------
async def search_jobs(redis: Redis, db: asyncpg.Pool, wanted: JobFilter) -> JobPage:
    """Newest first. Page 1 leads with the matching jobs Redis holds as waiting or running; the pages page
    through the history (job_runs). A text search looks SEARCH_WINDOW back unless `since` says otherwise; a whole
    job id is found however old."""
    tz = get_settings().tzinfo  # a time without an offset is the store's local time, as elsewhere in the API
    wanted = replace(wanted, since=_aware(wanted.since, tz), until=_aware(wanted.until, tz))
    wanted.check()
    if wanted.text and wanted.since is None:  # text reads every row it looks at: bound it (a whole id is found anyway)
        wanted = replace(wanted, since=datetime.now(UTC) - SEARCH_WINDOW)
    live = await _matching_live(redis, wanted) if wanted.page == 1 else []
    rows = await search_job_runs(
        db,
        task=wanted.task,
        queue=wanted.queue,
        status=wanted.status,
        since=wanted.since,
        until=wanted.until,
        text=wanted.text,
        offset=(wanted.page - 1) * PAGE_SIZE,
        limit=PAGE_SIZE + 1,
    )
    has_more, rows = len(rows) > PAGE_SIZE, rows[:PAGE_SIZE]
    if wanted.text and wanted.page == 1 and (whole := await get_job_run(db, wanted.text)):
        rows = [whole, *(r for r in rows if r["job_id"] != whole["job_id"])]  # a whole id is found however old
    history = [JobRow(status=client.status_of_row(r), args=r["args"] or [], kwargs=r["kwargs"] or {}) for r in rows]
    unbounded = replace(wanted, text=None, since=None, until=None)
    shown = {row.status.task_id for row in live}
    jobs = live + [row for row in history if row.status.task_id not in shown and _matches(row, unbounded)]
    return JobPage(jobs=jobs, page=wanted.page, has_more=has_more)


def _aware(moment: datetime | None, tz: tzinfo) -> datetime | None:
    return moment.replace(tzinfo=tz) if moment is not None and moment.tzinfo is None else moment


async def _matching_live(redis: Redis, wanted: JobFilter) -> list[JobRow]:
    found = []
    for status in await client.live_jobs(redis, queue=wanted.queue, status=wanted.status, limit=PAGE_SIZE):
        live = await js.read_live_job(redis, status.task_id, client.QUEUES)
        payload = live.payload if live else None
        row = JobRow(status=status, args=payload.args if payload else [], kwargs=payload.kwargs if payload else {})
        if _matches(row, wanted):
            found.append(row)
    return found


def _matches(row: JobRow, wanted: JobFilter) -> bool:
    job = row.status
    if (wanted.task or job.task_name) != job.task_name or (wanted.queue or job.queue) != job.queue:
        return False
    if (wanted.status or job.status) != job.status:
        return False
    enqueued = job.enqueued_at
    if (wanted.since and (enqueued is None or enqueued < wanted.since)) or (
        wanted.until and (enqueued is None or enqueued >= wanted.until)
    ):
        return False
    if wanted.text:
        text = wanted.text.lower()
        arguments = json.dumps([row.args, row.kwargs], default=str).lower()
        return job.task_id.lower().startswith(text) or text in arguments
    return True


async def job_detail(redis: Redis, db: asyncpg.Pool, principal: Principal, job_id: str) -> JobDetail:
    """One job; JobNotFoundError for an unknown id. Tracebacks show code and data paths: admins only."""
    job = await client.job_status(redis, db, job_id)
    args, kwargs = await client.job_arguments(redis, db, job_id)
    admin = principal.allows(Scope.ADMIN)
    spec = TASKS.get(job.task_name)
    may_operate = principal.allows(scope_to_operate(spec.scope if spec else None))
    duration = None
    if job.started_at and job.finished_at:
        duration = (job.finished_at - job.started_at).total_seconds()
    return JobDetail(
        job=job if admin else job.model_copy(update={"traceback": None}),
        args=args,
        kwargs=kwargs,
        duration_s=duration,
        traceback_hidden=bool(job.traceback) and not admin,
        can_abort=may_operate and job.status in ("queued", "deferred", "in_progress"),
        can_retry=may_operate and spec is not None and job.status in ("failed", "aborted"),
        tries=await _tries(db, job_id),
    )


async def _tries(db: asyncpg.Pool, job_id: str) -> list[TryInfo] | None:
    try:
        rows = await job_tries(db, job_id)
    except Exception as exc:
        if dependency_down(exc) != "postgresql":
            raise
        return None
    return [TryInfo.model_validate(row) for row in rows]


def task_forms(principal: Principal) -> list[TaskForm]:
    """The tasks this principal may trigger, each with its argument model's JSON schema."""
    return [
        TaskForm(
            name=spec.name,
            queue=spec.queue.value,
            description=spec.description,
            scope=scope_to_operate(spec.scope).value,
            schedule=spec.schedule.text if spec.schedule else "on demand",
            arguments=spec.args_model.model_json_schema(),
        )
        for spec in TASKS.values()
        if principal.allows(scope_to_operate(spec.scope))
    ]
