"""Moving job records from Redis into PostgreSQL `job_runs`, in batches, off the job path.

Workers LPUSH a record in the same Redis call that stores a result, so history survives a worker dying before
its next flush. One flusher at a time (a short Redis lock) reads the oldest records, writes them in one statement
(each job's newest record to `job_runs`, every try to `job_tries`), and only then trims them: a crash in between
just rewrites the same rows.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.history import write_history
from worker import jobstore as js
from worker.records import JobRecord, TryRecord, ms_to_dt

logger = logging.getLogger("salesdash.worker")
BATCH = 1000

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def record_to_row(record: JobRecord) -> dict[str, Any]:
    started, finished = record.started_ms, record.finished_ms
    return {
        "job_id": record.job_id,
        "task_name": record.task,
        "queue": record.queue,
        "args": json.dumps(record.args),
        "kwargs": json.dumps(record.kwargs),
        "status": record.status,
        "tries": record.tries,
        "priority": record.priority,
        "enqueued_at": ms_to_dt(record.enqueued_ms),
        "started_at": ms_to_dt(started),
        "finished_at": ms_to_dt(finished),
        "duration_ms": finished - started if started is not None else None,
        "result": None if record.result is None else json.dumps(record.result, default=str),
        "error": record.error,
        "traceback": record.traceback,
        "worker_id": record.worker_id,
        "retry_of": record.retry_of,
    }


def try_to_row(record: TryRecord) -> dict[str, Any]:
    started, finished = record.started_ms, record.finished_ms
    return {
        "job_id": record.job_id,
        "try_no": record.try_no,
        "outcome": record.outcome,
        "worker_id": record.worker_id,
        "started_at": ms_to_dt(started),
        "finished_at": ms_to_dt(finished),
        "duration_ms": finished - started if started is not None else None,
        "error": record.error,
    }


def _rows(raw: list[bytes]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The batch's run rows (each job's newest record) and try rows (every try that ran)."""
    latest: dict[str, dict[str, Any]] = {}
    tries: list[dict[str, Any]] = []
    for item in reversed(raw):  # oldest first, so a job's newest record wins
        try:
            entry = js.decode_history_entry(item)
        except js.BadPayload as exc:  # not ours to repair; say so and keep the rest flowing
            text = item[:200].decode(errors="replace")
            logger.error("history entry dropped", extra={"error": str(exc), "entry": text})
            continue
        if isinstance(entry, JobRecord):
            latest[entry.job_id] = record_to_row(entry)
            if entry.started_ms is None:  # never ran (aborted while waiting, refused): no try
                continue
            entry = TryRecord.of_record(entry)
        tries.append(try_to_row(entry))
    return list(latest.values()), tries


async def flush_history(redis: Redis, db: asyncpg.Pool | None, owner: str) -> int:
    """Write pending records to job_runs; returns how many. Safe to call from every worker often."""
    if db is None or not await redis.llen(js.HISTORY_KEY):  # type: ignore[misc]
        return 0
    if not await redis.set(js.HISTORY_LOCK_KEY, owner, nx=True, px=30_000):
        return 0
    written = 0
    try:
        while raw := await redis.lrange(js.HISTORY_KEY, -BATCH, -1):  # type: ignore[misc]
            await write_history(db, *_rows(raw))
            await redis.ltrim(js.HISTORY_KEY, 0, -len(raw) - 1)  # type: ignore[misc]
            written += len(raw)
            if len(raw) < BATCH:
                break
    finally:
        await redis.eval(_RELEASE_LUA, 1, js.HISTORY_LOCK_KEY, owner)  # type: ignore[misc]
    return written
