"""Durable job history (`job_runs`): batched upserts from workers, reads for the API and CLI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

_COLUMNS = (
    "job_id",
    "task_name",
    "queue",
    "args",
    "kwargs",
    "status",
    "tries",
    "priority",
    "enqueued_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "result",
    "error",
    "traceback",
    "worker_id",
    "retry_of",
)

# A batch is one statement: unnest the column arrays, upsert on job_id (a job may be written at each try; a row
# is only replaced by a record of the same or a later try).
_UPSERT = f"""
INSERT INTO job_runs ({", ".join(_COLUMNS)})
SELECT job_id, task_name, queue, args::jsonb, kwargs::jsonb, status, tries, priority, enqueued_at, started_at,
       finished_at, duration_ms, result::jsonb, error, traceback, worker_id, retry_of
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::smallint[],
              $9::timestamptz[], $10::timestamptz[], $11::timestamptz[], $12::numeric[], $13::text[], $14::text[],
              $15::text[], $16::text[], $17::text[])
       AS t({", ".join(_COLUMNS)})
ON CONFLICT (job_id) DO UPDATE SET
    status = EXCLUDED.status, tries = EXCLUDED.tries, started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at, duration_ms = EXCLUDED.duration_ms, result = EXCLUDED.result,
    error = EXCLUDED.error, traceback = EXCLUDED.traceback, worker_id = EXCLUDED.worker_id,
    recorded_at = now()
  -- a late record of an earlier try of the same job (a fenced one) never replaces a later try's
  WHERE job_runs.tries <= EXCLUDED.tries OR job_runs.enqueued_at IS DISTINCT FROM EXCLUDED.enqueued_at
"""


async def upsert_job_runs(conn: asyncpg.Connection | asyncpg.Pool, rows: Sequence[dict[str, Any]]) -> None:
    """Write a batch of run records; `args`, `kwargs`, `result` are JSON text (already serialised)."""
    if rows:
        await conn.execute(_UPSERT, *([row[c] for row in rows] for c in _COLUMNS))


async def get_job_run(conn: asyncpg.Connection | asyncpg.Pool, job_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM job_runs WHERE job_id = $1", job_id)
    return dict(row) if row else None


async def list_job_runs(
    conn: asyncpg.Connection | asyncpg.Pool, *, queue: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT * FROM job_runs
            WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
            ORDER BY enqueued_at DESC NULLS LAST LIMIT $3""",
        queue,
        status,
        limit,
    )
    return [dict(r) for r in rows]


async def job_run_counts(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT queue, task_name, status, count(*) AS n FROM job_runs GROUP BY 1, 2, 3")
    return [dict(r) for r in rows]


async def prune_job_runs(conn: asyncpg.Connection | asyncpg.Pool, older_than_days: int) -> int:
    status = await conn.execute(
        "DELETE FROM job_runs WHERE coalesce(finished_at, enqueued_at) < now() - make_interval(days => $1)",
        older_than_days,
    )
    return int(status.split()[-1])
