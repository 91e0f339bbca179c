"""Export files: their names under `SALESDASH_DATA_DIR/exports/`, the typed result of `export_analytics_data`, and
the lookup behind `GET /exports/{task_id}`. No job code: the API imports this module."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from worker import client
from worker.registry import ExportFormat

EXPORT_TASK = "export_analytics_data"
EXTENSIONS: dict[ExportFormat, str] = {"json": "ndjson", "csv": "csv", "parquet": "parquet"}
MEDIA_TYPES: dict[ExportFormat, str] = {
    "json": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
TEMP_SUFFIX = ".part"
PENDING_STATES = ("queued", "deferred", "in_progress")
_FILE_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")  # ids from arq's client are free text


class ExportResult(BaseModel):
    """What `export_analytics_data` returns: the file and what is in it."""

    path: str
    format: ExportFormat
    rows: int
    bytes: int
    sha256: str
    start_date: datetime
    end_date: datetime
    seconds: float


@dataclass(frozen=True)
class ExportFile:
    path: Path
    media_type: str

    @property
    def filename(self) -> str:
        return self.path.name


class ExportPendingError(RuntimeError):
    """The export's job has not finished: there is no file yet."""


class ExportMissingError(LookupError):
    """The job is not a complete export, or its file is gone."""


def export_name(job_id: str, export_format: ExportFormat) -> str:
    """The final name of a job's export: the same for every run of the job, so a second run replaces the first."""
    if not _FILE_SAFE_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a file (letters, digits and _.:- only)")
    return f"orders-{job_id}.{EXTENSIONS[export_format]}"


def temp_name(final_name: str) -> str:
    """A run's own hidden name for the file while it is written; `prune_exports` removes abandoned ones."""
    return f".{final_name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def is_export(name: str) -> bool:
    return name.startswith("orders-") and name.rsplit(".", 1)[-1] in EXTENSIONS.values()


async def find_export(redis: Redis, db: asyncpg.Pool, task_id: str, exports_dir: Path) -> ExportFile:
    """The file of a complete export job. Raises client.JobNotFoundError for an unknown id, ExportPendingError while
    the job is queued or running, ExportMissingError when it is not an export, did not complete, or its file is gone.
    """
    status = await client.job_status(redis, db, task_id)
    if status.task_name != EXPORT_TASK:
        raise ExportMissingError(f"job {task_id} is a {status.task_name} job, not an export")
    if status.status in PENDING_STATES:
        raise ExportPendingError(f"export {task_id} is {status.status}: its file is not written yet")
    if status.status != "complete":
        raise ExportMissingError(f"export {task_id} is {status.status}: it has no file")
    try:
        result = ExportResult.model_validate(status.result)
    except ValidationError:
        raise ExportMissingError(f"export {task_id} has no file in its result") from None
    path = exports_dir / export_name(task_id, result.format)
    if not path.is_file():
        raise ExportMissingError(f"the file of export {task_id} is gone (kept SALESDASH_EXPORT_RETENTION_DAYS days)")
    return ExportFile(path, MEDIA_TYPES[result.format])
