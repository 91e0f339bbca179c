"""The typed records that cross a boundary: a job's payload, the record of a finished try, a job's status
and a worker's self-description. How they are written to Redis is `worker.jobstore`'s business alone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel

JobState = Literal["queued", "deferred", "in_progress", "complete", "failed", "aborted"]
FinalState = Literal["complete", "failed", "aborted", "deferred"]  # "deferred": a failed try that will retry
JOB_STATES: tuple[JobState, ...] = ("queued", "deferred", "in_progress", "complete", "failed", "aborted")
PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5


def ms_to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, slots=True)
class JobPayload:
    """What a queued job is: the task, its arguments and the bookkeeping every try needs."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int
    enqueued_ms: int
    due_ms: int
    tries: int = 0  # tries already made (a lost try of a dead worker counts)
    retry_of: str | None = None
    notify: bool = False  # a client is waiting on the done list (`salesdash call --wait`)
    last_error: str | None = None
    # a dependency (postgresql, redis) the job could not reach: it waits for it without spending a try
    waiting_for: str | None = None
    waiting_since_ms: int | None = None  # when this stretch of waiting began: the wait budget counts from here
    waits: int = 0  # waits in this stretch: the backoff grows with them
    trace: dict[str, str] | None = None  # the enqueuer's W3C trace context (salesdash/tracing.py), when tracing


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The record of a finished try: kept as the job's result and written to `job_runs`."""

    job_id: str
    task: str
    queue: str
    status: FinalState
    args: list[Any]
    kwargs: dict[str, Any]
    enqueued_ms: int
    finished_ms: int
    tries: int
    priority: int
    started_ms: int | None = None  # None: the job never ran (aborted while queued, payload refused)
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    worker_id: str | None = None
    retry_of: str | None = None

    @property
    def success(self) -> bool:
        return self.status == "complete"


TryOutcome = Literal["complete", "failed", "retried", "aborted", "lost", "fenced", "waiting"]
# a try's outcome from the record its worker wrote ("deferred": it failed and the job will retry)
TRY_OUTCOME_OF_STATUS: dict[str, TryOutcome] = {
    "complete": "complete",
    "failed": "failed",
    "aborted": "aborted",
    "deferred": "retried",
}


@dataclass(frozen=True, slots=True)
class TryRecord:
    """One try of a job as `job_tries` keeps it. Finished tries come from their JobRecord; a try lost with a dead
    worker (written by the sweep that noticed it), a fenced one and a wait for a dependency have only this."""

    job_id: str
    try_no: int
    outcome: TryOutcome
    finished_ms: int  # for a lost try: when its lease was found expired
    started_ms: int | None = None
    worker_id: str | None = None
    error: str | None = None

    @classmethod
    def of_record(cls, record: JobRecord, outcome: TryOutcome | None = None) -> TryRecord:
        return cls(
            job_id=record.job_id,
            try_no=record.tries,
            outcome=outcome or TRY_OUTCOME_OF_STATUS[record.status],
            finished_ms=record.finished_ms,
            started_ms=record.started_ms,
            worker_id=record.worker_id,
            error=record.error,
        )


class TryInfo(BaseModel):
    """A try as the job detail shows it."""

    try_no: int
    outcome: TryOutcome
    worker_id: str | None = None
    host: str | None = None
    started_at: datetime | None = None
    finished_at: datetime
    duration_ms: float | None = None
    error: str | None = None


class Progress(BaseModel):
    fraction: float
    message: str = ""


class JobStatus(BaseModel):
    """A job as status readers see it (REST, GraphQL, the CLI, the dashboard)."""

    task_id: str
    task_name: str
    queue: str
    status: JobState
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    tries: int = 0
    priority: int = PRIORITY_DEFAULT
    progress: Progress | None = None
    worker_id: str | None = None
    waiting_for: str | None = None  # a deferred job waiting for PostgreSQL or Redis to come back (no try spent)

    @classmethod
    def of_record(cls, record: JobRecord) -> JobStatus:
        return cls(
            task_id=record.job_id,
            task_name=record.task,
            queue=record.queue,
            status=record.status,
            result=record.result,
            error=record.error,
            traceback=record.traceback,
            enqueued_at=ms_to_dt(record.enqueued_ms),
            started_at=ms_to_dt(record.started_ms),
            finished_at=ms_to_dt(record.finished_ms),
            tries=record.tries,
            priority=record.priority,
            worker_id=record.worker_id,
        )


class TaskInfo(BaseModel):
    """A task as the task table declares it (`GET /tasks`, GraphQL `backgroundTasks`)."""

    name: str
    queue: str
    schedule: str
    description: str
    scope: str


class WorkerInfo(BaseModel):
    """What a live worker says about itself every few seconds (`inspect`, `/dashboard`, `/queues`)."""

    worker_id: str
    queue: str
    host: str
    pid: int
    functions: list[str]
    running: list[str]
    jobs_complete: int
    jobs_failed: int
    jobs_retried: int
    max_jobs: int
    seen_ms: int
    started_ms: int = 0  # 0: a worker of a version that did not say
    rss_bytes: int = 0
