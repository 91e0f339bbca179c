"""Benchmark of what the monitoring page polls every 2 s, over a job history of realistic size: a scratch database
whose `job_runs` holds 30 days of the schedule's runs (about 1,200 a day) plus --on-demand other jobs, then each
read the page makes, timed, and side by side: the schedule's last-run lookup done two ways, the job lists in and out
of their index's order, and a history flush of 1,000 records with and without its tries (`job_tries`).

    .venv/bin/python bench/monitoring.py [--on-demand 300000] [--runs 30]
                                         [--database-url postgresql://postgres@127.0.0.1:5432]
                                         [--redis-url redis://127.0.0.1:6379/15]

The scratch database is created on the server of --database-url and dropped at the end; Redis is only read.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/monitoring.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable, Iterator  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queries import history  # noqa: E402
from salesdash.auth import OPERATOR  # noqa: E402
from salesdash.config import get_settings  # noqa: E402
from salesdash.connections import open_db_pool  # noqa: E402
from worker import monitoring  # noqa: E402
from worker.history import record_to_row, try_to_row  # noqa: E402
from worker.records import JobRecord, TryRecord  # noqa: E402
from worker.registry import TASKS  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"

# Each scheduled task's runs a day (its cron), over 30 days; on-demand jobs spread over the same days.
_CRON_HISTORY = """
INSERT INTO job_runs (job_id, task_name, queue, status, tries, enqueued_at, started_at, finished_at, duration_ms,
                      kwargs)
SELECT 'cron:' || t.name || ':' || g.i, t.name, t.queue, CASE WHEN g.i % 97 = 0 THEN 'failed' ELSE 'complete' END, 1,
       now() - g.i * (interval '1 day' / t.per_day), now() - g.i * (interval '1 day' / t.per_day) + interval '5 ms',
       now() - g.i * (interval '1 day' / t.per_day) + interval '250 ms', 245, '{}'
  FROM unnest($1::text[], $2::text[], $3::int[]) AS t(name, queue, per_day),
       LATERAL generate_series(1, t.per_day * 30) AS g(i)
"""
_ON_DEMAND = """
INSERT INTO job_runs (job_id, task_name, queue, status, tries, enqueued_at, started_at, finished_at, duration_ms,
                      kwargs)
SELECT 'job:' || g.i, 'export_analytics_data', 'analytics', CASE WHEN g.i % 50 = 0 THEN 'failed' ELSE 'complete' END,
       1, now() - g.i * (interval '30 days' / $1), now() - g.i * (interval '30 days' / $1) + interval '5 ms',
       now() - g.i * (interval '30 days' / $1) + (g.i % 900) * interval '1 ms', g.i % 900,
       jsonb_build_object('start_date', '2026-01-01', 'end_date', '2026-02-01', 'note', 'batch ' || g.i)
  FROM generate_series(1, $1::int) AS g(i)
"""


def _per_day(text: str) -> int:
    for marker, n in (("every 2 min", 720), ("every 5 min", 288), ("every 10 min", 144), ("every hour", 24)):
        if text.startswith(marker):
            return n
    return 1


async def _fill(pool: asyncpg.Pool, on_demand: int) -> int:
    scheduled = [s for s in TASKS.values() if s.schedule]
    per_day = [_per_day(s.schedule.text) if s.schedule else 0 for s in scheduled]
    await pool.execute(_CRON_HISTORY, [s.name for s in scheduled], [s.queue.value for s in scheduled], per_day)
    await pool.execute(_ON_DEMAND, on_demand)
    await pool.execute(_TRIES)
    await pool.execute("ANALYZE job_runs; ANALYZE job_tries")
    return int(await pool.fetchval("SELECT count(*) FROM job_runs"))


async def _time(runs: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    await call()  # warm
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def _flush_batches(count: int) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Batches of FLUSH_BATCH new records as a flush writes them: (job_runs rows, job_tries rows)."""
    for _ in range(count):
        now = int(time.time() * 1000)
        records = [
            JobRecord(uuid.uuid4().hex, "noop", "maintenance", "complete", [], {}, now - 9, now, 1, 5, now - 3, 1)
            for _ in range(FLUSH_BATCH)
        ]
        yield [record_to_row(r) for r in records], [try_to_row(TryRecord.of_record(r)) for r in records]


def _search(redis: Redis, pool: asyncpg.Pool, **wanted: Any) -> Awaitable[monitoring.JobPage]:
    return monitoring.search_jobs(redis, pool, monitoring.JobFilter(**wanted))


def _ms(samples: list[float]) -> tuple[str, str]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1000:.1f}", f"{p95 * 1000:.1f}"


async def main(args: argparse.Namespace) -> None:
    name = f"salesdash_bench_monitoring_{uuid.uuid4().hex[:8]}"
    server = args.database_url.rstrip("/")
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{server}/{name}"
        await asyncio.to_thread(upgrade, url)
        pool = await open_db_pool(get_settings().model_copy(update={"database_url": url}), max_size=4)
        redis = Redis.from_url(args.redis_url)
        try:
            await _run(pool, redis, args)
        finally:
            await pool.close()
            await redis.aclose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _run(pool: asyncpg.Pool, redis: Redis, args: argparse.Namespace) -> None:
    rows = await _fill(pool, args.on_demand)
    now = datetime.now(UTC)
    some_job = await pool.fetchval("SELECT job_id FROM job_runs WHERE status = 'failed' LIMIT 1")
    names = [s.name for s in TASKS.values() if s.schedule]
    month_ago = now - timedelta(days=30)
    before, after = _flush_batches(args.runs + 1), _flush_batches(args.runs + 1)
    reads: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("overview (queues, workers, schedule)", lambda: monitoring.overview(redis, pool)),
        ("  queue panels (per-minute figures)", lambda: monitoring.queue_panels(redis, pool, now)),
        ("  schedule (next runs, last runs)", lambda: monitoring.schedule_rows(pool, now)),
        ("jobs, page 1, no filter", lambda: monitoring.search_jobs(redis, pool, monitoring.JobFilter())),
        ("jobs, status=failed", lambda: monitoring.search_jobs(redis, pool, monitoring.JobFilter(status="failed"))),
        ("jobs, page 1, ordered NULLS LAST (before)", lambda: pool.fetch(_NULLS_LAST, monitoring.PAGE_SIZE + 1)),
        ("jobs, page 40", lambda: monitoring.search_jobs(redis, pool, monitoring.JobFilter(page=40))),
        ("jobs, search arguments (last 7 days)", lambda: _search(redis, pool, text="batch 77")),
        ("jobs, search arguments (last 30 days)", lambda: _search(redis, pool, text="batch 77", since=month_ago)),
        ("jobs, search id prefix (last 7 days)", lambda: _search(redis, pool, text="job:123")),
        ("jobs, search a whole id", lambda: _search(redis, pool, text=some_job)),
        ("REST GET /jobs (list_job_runs, the index's order)", lambda: _rest_list(pool)),
        ("REST GET /jobs, ordered NULLS LAST (before)", lambda: pool.fetch(_REST_NULLS_LAST, 50)),
        ("job detail (with its tries)", lambda: monitoring.job_detail(redis, pool, OPERATOR, some_job)),
        (
            f"flush {FLUSH_BATCH:,} records: job_runs only (before)",
            lambda: history.upsert_job_runs(pool, next(before)[0]),
        ),
        (
            f"flush {FLUSH_BATCH:,} records: + job_tries, one statement",
            lambda: history.write_history(pool, *next(after)),
        ),
        ("last runs: by the ticks' job ids (used)", lambda: monitoring.schedule_rows(pool, now)),
        ("last runs: DISTINCT ON over the history", lambda: pool.fetch(_DISTINCT_ON, names)),
    ]
    table = Table(title=f"monitoring page reads over {rows:,} job_runs rows ({args.runs} runs each)")
    for column in ("read", "median ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "read" else "right")
    medians = {}
    for label, call in reads:
        samples = await _time(args.runs, call)
        medians[label] = statistics.median(samples)
        table.add_row(label, *_ms(samples))
    Console().print(table)
    ratio = medians["last runs: DISTINCT ON over the history"] / medians["last runs: by the ticks' job ids (used)"]
    Console().print(f"last runs, DISTINCT ON / by tick ids = {ratio:.1f}")
    ratio = medians["jobs, page 1, ordered NULLS LAST (before)"] / medians["jobs, page 1, no filter"]
    Console().print(f"job list page 1, NULLS LAST order / the index's order = {ratio:.1f}")
    ratio = (
        medians["REST GET /jobs, ordered NULLS LAST (before)"]
        / medians["REST GET /jobs (list_job_runs, the index's order)"]
    )
    Console().print(f"REST GET /jobs, NULLS LAST order / the index's order = {ratio:.1f}")
    ratio = (
        medians[f"flush {FLUSH_BATCH:,} records: + job_tries, one statement"]
        / medians[f"flush {FLUSH_BATCH:,} records: job_runs only (before)"]
    )
    Console().print(f"history flush with every try / without = {ratio:.2f}")


def _rest_list(pool: asyncpg.Pool) -> Awaitable[Any]:
    return history.list_job_runs(pool, queue=None, status=None, limit=50)


# The job list as first written: its ORDER BY did not match job_runs_recent_idx (enqueued_at DESC, nulls first), so
# every poll sorted the whole table.
_NULLS_LAST = """SELECT * FROM job_runs ORDER BY enqueued_at DESC NULLS LAST, job_id LIMIT $1"""
FLUSH_BATCH = 1000  # worker/history.py's BATCH
# One try per recorded run that started, as the flush would have written them
_TRIES = """
INSERT INTO job_tries (job_id, try_no, outcome, worker_id, host, started_at, finished_at, duration_ms, error)
SELECT job_id, greatest(tries, 1), CASE status WHEN 'deferred' THEN 'retried' ELSE status END, worker_id,
       split_part(worker_id, ':', 1), started_at, finished_at, duration_ms, error
  FROM job_runs WHERE started_at IS NOT NULL AND finished_at IS NOT NULL
   AND status IN ('complete', 'failed', 'aborted', 'deferred')
"""
_REST_NULLS_LAST = """SELECT * FROM job_runs ORDER BY enqueued_at DESC NULLS LAST LIMIT $1"""
_DISTINCT_ON = """SELECT DISTINCT ON (task_name) task_name, job_id, status, finished_at, error FROM job_runs
                   WHERE task_name = ANY($1::text[]) ORDER BY task_name, enqueued_at DESC NULLS LAST"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--on-demand", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_SERVER))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    asyncio.run(main(parser.parse_args()))
