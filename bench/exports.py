"""Benchmark of `export_analytics_data`: a scratch database seeded with db.seed, then one real worker process per
format (`python -m worker analytics --burst`) exports every order of the seeded year; one table.

    .venv/bin/python bench/exports.py [--orders 1000000] [--formats csv,json] [--runs 2] [--database-url URL]
                                      [--redis-url URL]

rows/s is the job's own `rows / seconds` (count, COPY, writing, fsync and rename). Peak RSS is the worker process's
high-water mark (VmHWM), so it covers its start and imports too; the `idle worker` row is the same process
running no job. Worker CPU s is the worker process's CPU time, start included (the rest of an export's time is
PostgreSQL's). The scratch database (created on the server of --database-url, default
$DATABASE_URL or the local server) and the data directory are removed at the end. The jobs go through Redis
--redis-url (default redis://127.0.0.1:6379/15): nothing there is flushed.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/exports.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
# (which asyncio's thread pool imports): put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _server(url: str) -> str:
    """The URL without its database name (postgresql://user@host:port)."""
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _peak_rss_kib(pid: int) -> int:
    """The process's RSS high-water mark (VmHWM). Not wait4's ru_maxrss: Linux carries the forking parent's RSS
    over exec into it, so a child of this (large, seeded) process would report at least the parent's size."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _run_worker(env: dict[str, str]) -> tuple[int, float]:
    """One `python -m worker analytics --burst` to its end; returns its peak RSS in KiB and its CPU seconds, read
    every 20 ms (both only grow, so the last reading misses at most the last 20 ms)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "analytics", "--burst"], cwd=_ROOT, env=env, stdout=subprocess.DEVNULL
    )
    peak, cpu = 0, 0.0
    while proc.poll() is None:
        peak, cpu = max(peak, _peak_rss_kib(proc.pid)), max(cpu, _cpu_seconds(proc.pid))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited with {proc.returncode}")
    return peak, cpu


async def export_job(redis: Redis, db: asyncpg.Pool, env: dict[str, str], kwargs: dict[str, Any]) -> dict[str, Any]:
    from salesdash.auth import OPERATOR
    from worker import client

    job = await client.enqueue_task(redis, OPERATOR, "export_analytics_data", kwargs=kwargs)
    rss_kib, cpu_s = await asyncio.to_thread(_run_worker, env)
    status = await client.job_status(redis, db, job.task_id)
    if status.status != "complete":
        raise RuntimeError(f"export {kwargs['export_format']} ended {status.status}: {status.error}")
    return {**status.result, "rss_kib": rss_kib, "cpu_s": cpu_s}


async def _bench(args: argparse.Namespace, console: Console) -> tuple[tuple[int, float], list[dict[str, Any]]]:
    from db.migrate import upgrade
    from db.seed import seed

    server = _server(args.database_url)
    name = f"salesdash_bench_exports_{uuid.uuid4().hex[:8]}"
    data_dir = tempfile.mkdtemp(prefix="salesdash-bench-exports-")
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{server}/{name}"
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": args.redis_url, "SALESDASH_DATA_DIR": data_dir}
    env["SALESDASH_LOG_LEVEL"] = "WARNING"
    os.environ.update(env)  # this process validates and enqueues with the same settings
    from salesdash.config import get_settings

    get_settings.cache_clear()
    try:
        await asyncio.to_thread(upgrade, url)
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as db:
            async with db.acquire() as conn:
                summary = await seed(
                    conn, customers=args.orders // 10, products=2_000, orders=args.orders, months=12, seed=42,
                    progress=False, dsn=url,
                )  # fmt: skip
            assert summary.window_start is not None and summary.window_end is not None
            await db.execute("ANALYZE")  # as autovacuum would soon: the plan then streams (db/queries/exports.py)
            console.print(f"seeded {summary.orders:,} orders in {summary.seconds:.1f}s into {name}")
            window = {"start_date": summary.window_start.isoformat(), "end_date": None}
            window["end_date"] = (summary.window_end + timedelta(seconds=1)).isoformat()
            redis = Redis.from_url(args.redis_url)
            try:
                idle = await asyncio.to_thread(_run_worker, env)
                results = [
                    {**await export_job(redis, db, env, {**window, "export_format": f}), "run": run}
                    for run in range(1, args.runs + 1)
                    for f in args.formats
                ]
            finally:
                await redis.aclose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return idle, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--formats", type=lambda s: s.split(","), default=["csv", "json"], help="csv,json,parquet")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--runs", type=int, default=2, help="export each format this many times")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    console = Console(width=120)
    (idle_rss, idle_cpu), results = asyncio.run(_bench(args, console))

    table = Table(title=f"export_analytics_data: {args.orders:,} orders seeded over 12 months, one worker process")
    for column in ("run", "format", "rows", "file MB", "seconds", "rows/s", "worker peak RSS MB", "worker CPU s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["run"]), r["format"], f"{r['rows']:,}", f"{r['bytes'] / 1e6:,.1f}", f"{r['seconds']:.2f}",
            f"{r['rows'] / r['seconds']:,.0f}", f"{r['rss_kib'] / 1024:,.0f}", f"{r['cpu_s']:.1f}",
        )  # fmt: skip
    table.add_row("", "idle worker", "", "", "", "", f"{idle_rss / 1024:,.0f}", f"{idle_cpu:.1f}")
    console.print(table)
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
