"""Benchmark of the maintenance jobs: a scratch database seeded with db.seed (1,000,000 customers, 5,000,000 orders
over 24 months by default), then each job in its own worker process (`python -m worker maintenance --burst`), each
next to one plain scan of the orders measured just before it (the floor); one table.

    .venv/bin/python bench/maintenance.py [--customers 1000000] [--orders 5000000] [--database-url URL]
                                          [--redis-url redis://127.0.0.1:6379/15] [--keep-database NAME]

The floor is `SELECT customer_id, count(*), sum(total_amount), max(created_at) FROM orders GROUP BY 1`, its rows
streamed to this process (COPY ... TO STDOUT, the way the lifetime-value job reads its summary) and dropped; each
row's floor is the median of three runs, two just before the job and one just after (the machine is shared).
Each row starts on a quiet server: a CHECKPOINT, and no autovacuum worker left in the scratch database. A job's
seconds are its run in the worker (started to finished, from its record); ratio = job / floor. Peak RSS is the
worker process's high-water mark (VmHWM), start and imports included. The lifetime-value job runs three times (see
ROWS): as of yesterday on freshly seeded customers, as of today, and as of today again.
"oldest xact s" is the age of the oldest transaction holding an xid anywhere on the server around the job: while one
runs (another database's long load), dead row versions cannot be pruned, updates stop being HOT, and the lifetime-value
job's write slows down through nothing of its own. The scratch database is created on the server of --database-url
(default $DATABASE_URL or the local server) and dropped at the end; jobs go through Redis --redis-url, where nothing is
flushed. --keep-database NAME seeds into NAME and keeps it; a later run with the same NAME reuses it without seeding,
after putting back what the jobs write (every customer unsegmented and unscored, no segment history, no fitted model)
and a VACUUM ANALYZE, so that every row measures the same runs as on a fresh seed.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/maintenance.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
# (which asyncio's thread pool imports): put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
FLOOR = "SELECT customer_id, count(*), sum(total_amount), max(created_at) FROM orders GROUP BY 1"


@dataclass
class Row:
    job: str
    seconds: float | None  # None: the job is not on this branch
    floor_s: float
    target: str  # e.g. "≤ 2x floor"
    max_ratio: float | None
    rss_mb: float | None
    note: str
    oldest_xact_s: float  # the oldest transaction on the server around the job (see _oldest_transaction_s)


def _server(url: str) -> str:
    """The URL without its database name (postgresql://user@host:port)."""
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's own RSS high-water mark (ru_maxrss of a child would include this process's size)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _run_worker(env: dict[str, str]) -> int:
    """One `python -m worker maintenance --burst` to its end; its peak RSS in KiB, read every 20 ms."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "maintenance", "--burst"], cwd=_ROOT, env=env, stdout=subprocess.DEVNULL
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _peak_rss_kib(proc.pid))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited with {proc.returncode}")
    return peak


async def _floor(db: asyncpg.Pool) -> float:
    async def drop(_: bytes) -> None:
        return None

    async with db.acquire() as conn:
        started = time.perf_counter()
        await conn.copy_from_query(FLOOR, output=drop, format="binary")
        return time.perf_counter() - started


@dataclass
class Bench:
    db: asyncpg.Pool
    redis: Redis
    env: dict[str, str]

    async def job(self, task: str, kwargs: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Enqueue `task`, run it in a worker process of its own; (seconds in the worker, peak RSS KiB, result)."""
        from salesdash.auth import OPERATOR
        from worker import client

        job = await client.enqueue_task(self.redis, OPERATOR, task, kwargs=kwargs)
        rss_kib = await asyncio.to_thread(_run_worker, self.env)
        status = await client.job_status(self.redis, self.db, job.task_id)
        if status.status != "complete" or status.started_at is None or status.finished_at is None:
            raise RuntimeError(f"{task} ended {status.status}: {status.error}")
        return (status.finished_at - status.started_at).total_seconds(), rss_kib, status.result

    async def row(self, spec: RowSpec) -> Row:
        from worker.registry import TASKS

        wanted = f"≤ {spec.target:g}x floor" if spec.target else ""
        if spec.task not in TASKS:
            return Row(spec.label, None, await _floor(self.db), wanted, spec.target, None, "not on this branch", 0.0)
        await _settle(self.db)
        floors = [await _floor(self.db), await _floor(self.db)]
        oldest = await _oldest_transaction_s(self.db)
        seconds, rss_kib, result = await self.job(spec.task, spec.kwargs())
        oldest = max(oldest, await _oldest_transaction_s(self.db))
        floors.append(await _floor(self.db))
        floor = statistics.median(floors)
        return Row(spec.label, seconds, floor, wanted, spec.target, rss_kib / 1024, spec.note(result), oldest)


async def _settle(db: asyncpg.Pool, timeout_s: float = 300) -> None:
    """Each row starts on a quiet server, as the jobs do in production, hours apart: the dirty pages of what ran
    before (the seed or the reset, the previous job) written out by a CHECKPOINT, and no autovacuum worker left in
    this database (the previous job's updated rows wake it up; on 2 cores it would run beside the next job)."""
    await db.execute("CHECKPOINT")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and await db.fetchval(
        """SELECT count(*) FROM pg_stat_activity
            WHERE backend_type = 'autovacuum worker' AND datname = current_database()"""
    ):
        await asyncio.sleep(0.5)


async def _oldest_transaction_s(db: asyncpg.Pool) -> float:
    """The age of the oldest transaction holding an xid on the whole server. While one runs, no dead row version
    younger than it can be pruned in any database, so rows updated twice no longer fit beside their old versions
    (no HOT update): the lifetime-value job's write slows down, through nothing of its own."""
    age = await db.fetchval(
        """SELECT coalesce(extract(epoch FROM max(now() - xact_start)), 0) FROM pg_stat_activity
            WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"""
    )
    return float(age)


def _ltv_note(result: dict[str, Any]) -> str:
    fit, parts = result["fit"], result["seconds"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in parts.items() if k != "total")
    converged = "fit converged" if fit["converged"] else f"fit failed: {fit['message']}"
    return f"{result['updated']:,} rows written; {converged}; {phases}"


def _health_note(result: dict[str, Any]) -> str:
    return f"{len(result['checks'])} checks, failing: {', '.join(result['failing']) or 'none'}"


def _segments_note(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, int | float))[:80]


@dataclass(frozen=True)
class RowSpec:
    task: str
    label: str
    target: float | None  # the job's time may be at most this many floors
    note: Callable[[dict[str, Any]], str]  # what to say about its result
    kwargs: Callable[[], dict[str, Any]] = dict  # its arguments, made when it is enqueued


def _local_day(days_ago: int) -> str:
    from salesdash.config import get_settings

    return (datetime.now(get_settings().tzinfo).date() - timedelta(days=days_ago)).isoformat()


# One row per job run. The lifetime-value job runs as of yesterday (the first run: every customer written), then
# as of today (what a daily run does: every buyer's predictions moved by a day), then as of today again (nothing
# changed, nothing written).
ROWS: list[RowSpec] = [
    RowSpec("update_customer_segments", "update_customer_segments", 2.0, _segments_note),
    RowSpec(
        "update_customer_lifetime_values", "lifetime values, first run (as of yesterday)", 3.0, _ltv_note,
        lambda: {"as_of": _local_day(1)},
    ),
    RowSpec("update_customer_lifetime_values", "lifetime values, the next day (as of today)", 3.0, _ltv_note),
    RowSpec("update_customer_lifetime_values", "lifetime values, again the same day", 3.0, _ltv_note),
    RowSpec("check_system_health", "check_system_health", None, _health_note),
]  # fmt: skip


async def _seeded(args: argparse.Namespace, url: str, console: Console) -> None:
    from db.migrate import upgrade
    from db.seed import seed

    await asyncio.to_thread(upgrade, url)
    conn = await asyncpg.connect(url)
    try:
        summary = await seed(
            conn, customers=args.customers, products=2_000, orders=args.orders, months=24, seed=42, progress=False,
            dsn=url,
        )  # fmt: skip
        await conn.execute("VACUUM ANALYZE")  # as autovacuum soon would after a load
    finally:
        await conn.close()
    console.print(f"seeded {summary.customers:,} customers, {summary.orders:,} orders in {summary.seconds:.0f}s")


# What the jobs write, put back as the seed leaves it: a reused database's first runs are first runs again.
_RESET = [
    """UPDATE customers SET segment = NULL, rfm_recency = NULL, rfm_frequency = NULL, rfm_monetary = NULL,
              segment_updated_at = NULL, lifetime_value = NULL, ltv_updated_at = NULL, probability_alive = NULL,
              expected_purchases_12m = NULL, predicted_ltv_12m = NULL""",
    "TRUNCATE customer_segment_history, lifetime_value_models",
]


async def _reset(url: str, console: Console) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in _RESET:
            await conn.execute(statement)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    console.print("reusing the database as seeded by an earlier run (--keep-database), the jobs' output put back")


async def _bench(args: argparse.Namespace, console: Console) -> list[Row]:
    server = _server(args.database_url)
    name = args.keep_database or f"salesdash_bench_maintenance_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    reused = bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    if not reused:
        await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{server}/{name}"
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": args.redis_url, "SALESDASH_LOG_LEVEL": "WARNING"}
    os.environ.update(env)  # this process validates and enqueues with the same settings
    from salesdash.config import get_settings

    get_settings.cache_clear()
    try:
        if reused:
            from db.migrate import upgrade

            await asyncio.to_thread(upgrade, url)
            await _reset(url, console)
        else:
            await _seeded(args, url, console)
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as db:
            redis = Redis.from_url(args.redis_url)
            try:
                bench = Bench(db, redis, env)
                await _floor(db)  # warm the cache once, as every later scan finds it
                return [await bench.row(spec) for spec in ROWS]
            finally:
                await redis.aclose()
    finally:
        if not args.keep_database:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _table(args: argparse.Namespace, rows: list[Row]) -> Table:
    table = Table(
        title=f"maintenance jobs: {args.customers:,} customers, {args.orders:,} orders over 24 months; "
        "each job in its own worker process"
    )
    for column in ("job", "seconds", "floor s", "x floor", "target", "worker peak RSS MB", "oldest xact s", "notes"):
        table.add_column(column, justify="left" if column in ("job", "notes", "target") else "right")
    for r in rows:
        ratio = "" if r.seconds is None else f"{r.seconds / r.floor_s:.2f}"
        ok = (
            "" if r.seconds is None or r.max_ratio is None else (" ✓" if r.seconds <= r.max_ratio * r.floor_s else " ✗")
        )
        table.add_row(
            r.job,
            "—" if r.seconds is None else f"{r.seconds:.2f}",
            f"{r.floor_s:.2f}",
            ratio + ok,
            r.target,
            "—" if r.rss_mb is None else f"{r.rss_mb:,.0f}" + (" ✓" if r.rss_mb < 500 else " ✗"),
            f"{r.oldest_xact_s:.0f}",
            r.note,
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--orders", type=int, default=5_000_000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="a Redis db of its own")
    parser.add_argument(
        "--keep-database", metavar="NAME", help="seed into this database and keep it; a later run reuses it (reset)"
    )
    args = parser.parse_args()
    console = Console(width=160)
    rows = asyncio.run(_bench(args, console))
    console.print(_table(args, rows))
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    console.print("targets: segments ≤ 2x floor, lifetime values ≤ 3x floor, peak worker RSS < 500 MB")


if __name__ == "__main__":
    main()
