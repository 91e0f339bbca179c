"""Moving job records from Redis into PostgreSQL `job_runs`, in batches, off the job path.

Workers LPUSH a record in the same Redis transaction that stores a result, so history survives a worker
dying before its next flush. One flusher at a time (a short Redis lock) reads the oldest records, upserts
them in one statement, and only then trims them: a crash in between just rewrites the same rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries.jobs import upsert_job_runs
from worker.jobstore import HISTORY_KEY

LOCK_KEY = "salesdash:history:lock"
BATCH = 1000

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def record_to_row(record: dict[str, Any]) -> dict[str, Any]:
    started, finished = record.get("started_ms"), record.get("finished_ms")
    return {
        "job_id": record["job_id"], "task_name": record["task_name"], "queue": record["queue"],
        "args": json.dumps(record.get("args") or []), "kwargs": json.dumps(record.get("kwargs") or {}),
        "status": record["status"], "tries": record.get("tries", 0), "priority": record.get("priority", 5),
        "enqueued_at": _dt(record.get("enqueued_ms")), "started_at": _dt(started), "finished_at": _dt(finished),
        "duration_ms": (finished - started) if started is not None and finished is not None else None,
        "result": None if record.get("result") is None else json.dumps(record["result"], default=str),
        "error": record.get("error"), "traceback": record.get("traceback"),
        "worker_id": record.get("worker_id"), "retry_of": record.get("retry_of"),
    }


async def flush_history(redis: Redis, db: asyncpg.Pool | None, owner: str) -> int:
    """Write pending records to job_runs; returns how many. Safe to call from every worker often."""
    if db is None or not await redis.llen(HISTORY_KEY):  # type: ignore[misc]
        return 0
    if not await redis.set(LOCK_KEY, owner, nx=True, px=30_000):
        return 0
    written = 0
    try:
        while raw := await redis.lrange(HISTORY_KEY, -BATCH, -1):  # type: ignore[misc]
            latest: dict[str, dict[str, Any]] = {}
            for item in reversed(raw):  # oldest first, so a job's newest record wins
                record = json.loads(item)
                latest[record["job_id"]] = record_to_row(record)
            await upsert_job_runs(db, list(latest.values()))
            await redis.ltrim(HISTORY_KEY, 0, -len(raw) - 1)  # type: ignore[misc]
            written += len(raw)
            if len(raw) < BATCH:
                break
    finally:
        await redis.eval(_RELEASE_LUA, 1, LOCK_KEY, owner)  # type: ignore[misc]
    return written
