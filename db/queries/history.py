"""Durable job history (`job_runs`): batched upserts from workers, reads for the API and CLI."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
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


TRY_COLUMNS = ("job_id", "try_no", "outcome", "worker_id", "started_at", "finished_at", "duration_ms", "error")

# The runs' upsert and the tries' insert in one statement (one round trip, one transaction): every try of the
# batch, each once (a flush rewritten after a crash meets the primary key and inserts nothing).
_WRITE_HISTORY = f"""
WITH runs AS ({_UPSERT})
INSERT INTO job_tries ({", ".join(TRY_COLUMNS)}, host)
SELECT t.*, split_part(t.worker_id, ':', 1)
  FROM unnest($18::text[], $19::int[], $20::text[], $21::text[], $22::timestamptz[], $23::timestamptz[],
              $24::numeric[], $25::text[]) AS t({", ".join(TRY_COLUMNS)})
ON CONFLICT DO NOTHING
"""


async def write_history(
    conn: asyncpg.Connection | asyncpg.Pool, runs: Sequence[dict[str, Any]], tries: Sequence[dict[str, Any]]
) -> None:
    """A flushed batch: run records (as `upsert_job_runs`) and the tries (`TRY_COLUMNS`) in one statement."""
    if runs or tries:
        await conn.execute(
            _WRITE_HISTORY,
            *([row[c] for row in runs] for c in _COLUMNS),
            *([row[c] for row in tries] for c in TRY_COLUMNS),
        )


async def job_tries(conn: asyncpg.Connection | asyncpg.Pool, job_id: str) -> list[dict[str, Any]]:
    """A job's tries, in the order they ended."""
    rows = await conn.fetch(
        f"SELECT {', '.join(TRY_COLUMNS)}, host FROM job_tries WHERE job_id = $1 ORDER BY finished_at, try_no",
        job_id,
    )
    return [dict(r) for r in rows]


async def get_job_run(conn: asyncpg.Connection | asyncpg.Pool, job_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM job_runs WHERE job_id = $1", job_id)
    return dict(row) if row else None


async def list_job_runs(
    conn: asyncpg.Connection | asyncpg.Pool, *, queue: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT * FROM job_runs
            WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
            ORDER BY enqueued_at DESC LIMIT $3""",
        queue,
        status,
        limit,
    )
    return [dict(r) for r in rows]


async def job_run_counts(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT queue, task_name, status, count(*) AS n FROM job_runs GROUP BY 1, 2, 3")
    return [dict(r) for r in rows]


# Old runs go with their tries (by primary key), in one statement; so do old tries whose run was never recorded (a
# job lost, then expired). The two sets are disjoint: a try is in one only if its job had a run row. The count
# returned is the runs'.
_PRUNE = """
WITH runs AS (
    DELETE FROM job_runs WHERE coalesce(finished_at, enqueued_at) < now() - make_interval(days => $1)
    RETURNING job_id
), tries AS (
    DELETE FROM job_tries t USING runs WHERE t.job_id = runs.job_id
), orphans AS (
    DELETE FROM job_tries t
     WHERE t.finished_at < now() - make_interval(days => $1)
       AND NOT EXISTS (SELECT 1 FROM job_runs r WHERE r.job_id = t.job_id)
)
SELECT count(*) FROM runs
"""


async def prune_job_runs(conn: asyncpg.Connection | asyncpg.Pool, older_than_days: int) -> int:
    return int(await conn.fetchval(_PRUNE, older_than_days))


async def search_job_runs(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    task: str | None,
    queue: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    text: str | None,
    offset: int,
    limit: int,
) -> list[dict[str, Any]]:
    """The monitoring page's job list: newest first, every filter optional; `text` matches a job id prefix or
    any part of the arguments' JSON (case-insensitive)."""
    pattern = None if not text else "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = await conn.fetch(
        """SELECT * FROM job_runs
            WHERE ($1::text IS NULL OR task_name = $1) AND ($2::text IS NULL OR queue = $2)
              AND ($3::text IS NULL OR status = $3)
              AND ($4::timestamptz IS NULL OR enqueued_at >= $4) AND ($5::timestamptz IS NULL OR enqueued_at < $5)
              AND ($6::text IS NULL OR job_id ILIKE $7 || '%' OR args::text ILIKE $6 OR kwargs::text ILIKE $6)
            ORDER BY enqueued_at DESC, job_id LIMIT $8 OFFSET $9""",
        task,
        queue,
        status,
        since,
        until,
        pattern,
        None if pattern is None else pattern[1:-1],
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def minute_stats(conn: asyncpg.Connection | asyncpg.Pool, since: datetime) -> list[dict[str, Any]]:
    """Per queue and minute since `since` (by finish time): jobs finished, failed, and the p95 run time in ms."""
    rows = await conn.fetch(
        """SELECT queue, date_trunc('minute', finished_at) AS minute, count(*) AS finished,
                  count(*) FILTER (WHERE status = 'failed') AS failed,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms
             FROM job_runs WHERE finished_at >= $1
            GROUP BY 1, 2 ORDER BY 1, 2""",
        since,
    )
    return [dict(r) for r in rows]


async def runs_by_id(conn: asyncpg.Connection | asyncpg.Pool, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The recorded runs among `job_ids` (primary-key lookups), by id."""
    rows = await conn.fetch(
        "SELECT job_id, task_name, status, finished_at, error FROM job_runs WHERE job_id = ANY($1::text[])",
        list(job_ids),
    )
    return {r["job_id"]: dict(r) for r in rows}
