"""Benchmark of the dashboard payloads and their cache: a scratch database with seeded orders (rollups rebuilt by
the loader), then each payload computed from the rollups, one warm_dashboard_cache pass, cache hits, and cold
misses with many callers at once.

    .venv/bin/python bench/dashboard.py [--orders 1000000] [--runs 20] [--callers 50]
                                        [--database-url postgresql://postgres@127.0.0.1:5432]
                                        [--redis-url redis://127.0.0.1:6379/15]

The scratch database is created on the server of --database-url and dropped at the end. The cache's keys
(salesdash:cache:v1:*) are written to the --redis-url database and deleted at the end: give it a database no
running system uses, or its API would serve the scratch figures.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/dashboard.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.seed import seed  # noqa: E402
from worker import cache, dashboard  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _server(url: str) -> str:
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _ms(samples: list[float]) -> tuple[str, str]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1000:.2f}", f"{p99 * 1000:.2f}"


async def _clear_cache(redis: Redis) -> None:
    keys = [k async for k in redis.scan_iter(f"{cache.PREFIX}:*")]
    if keys:
        await redis.delete(*keys)


async def _computations(db: asyncpg.Pool, runs: int) -> list[tuple[str, str, str, str]]:
    rows = []
    moment = dashboard.Moment.current()
    for req in dashboard.warm_requests(moment):
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            await dashboard.compute_all(db, [req])
            samples.append(time.perf_counter() - started)
        shown = ", ".join(f"{k}={v}" for k, v in req.args.model_dump(mode="json").items())
        rows.append((req.query.name, shown, *_ms(samples)))
    return rows


async def _warm(db: asyncpg.Pool, redis: Redis, runs: int) -> tuple[str, str]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        entries = await dashboard.compute_all(db, dashboard.warm_requests(dashboard.Moment.current()))
        await cache.store_all(redis, entries, 600)
        samples.append(time.perf_counter() - started)
    return _ms(samples)


async def _hits(db: asyncpg.Pool, redis: Redis, runs: int) -> tuple[str, str]:
    samples = []
    for _ in range(runs * 10):
        started = time.perf_counter()
        await dashboard.read(redis, db, dashboard.TOP_PRODUCTS, {"range": "last_30_days"})
        samples.append(time.perf_counter() - started)
    return _ms(samples)


async def _stampede(db: asyncpg.Pool, redis: Redis, runs: int, callers: int) -> tuple[str, str, int]:
    samples, computed = [], 0
    for _ in range(runs):
        await _clear_cache(redis)
        started = time.perf_counter()
        await asyncio.gather(
            *(dashboard.read(redis, db, dashboard.SALES_OVERVIEW, {"range": "last_30_days"}) for _ in range(callers))
        )
        samples.append(time.perf_counter() - started)
        computed += (await cache.computations(redis)).get("sales_overview", 0)
    return (*_ms(samples), computed)


async def _bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    server = _server(args.database_url)
    name = f"salesdash_bench_dashboard_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    redis = Redis.from_url(args.redis_url)
    try:
        url = f"{server}/{name}"
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(url)
        try:
            summary = await seed(
                conn, customers=args.orders // 10, products=2_000, orders=args.orders, months=24, seed=42,
                progress=False, dsn=url,
            )  # fmt: skip
        finally:
            await conn.close()
        console.print(f"seeded {summary.orders:,} orders in {summary.seconds:.1f}s (rollups rebuilt by the loader)")
        db = await asyncpg.create_pool(url, min_size=2, max_size=10)
        assert db is not None
        try:
            await _clear_cache(redis)
            return {
                "computations": await _computations(db, args.runs),
                "warm": await _warm(db, redis, args.runs),
                "hits": await _hits(db, redis, args.runs),
                "stampede": await _stampede(db, redis, args.runs, args.callers),
            }
        finally:
            await _clear_cache(redis)
            await db.close()
    finally:
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--callers", type=int, default=50, help="concurrent callers on a cold key")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="a Redis db of its own")
    args = parser.parse_args()
    console = Console(width=120)
    result = asyncio.run(_bench(args, console))

    table = Table(title=f"one payload from the rollups ({args.orders:,} orders, {args.runs} runs each)")
    for column in ("payload", "args", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column in ("payload", "args") else "right")
    for row in result["computations"]:
        table.add_row(*row)
    console.print(table)

    cached = Table(title="the cache")
    for column in ("what", "p50 ms", "p99 ms", "note"):
        cached.add_column(column, justify="right" if "ms" in column else "left")
    n = len(dashboard.warm_requests(dashboard.Moment.current()))
    cached.add_row("warm pass", *result["warm"], f"{n} payloads, one snapshot, one MULTI/EXEC")
    cached.add_row("hit", *result["hits"], "dashboard.read of a stored payload")
    p50, p99, computed = result["stampede"]
    cached.add_row(
        f"cold miss, {args.callers} callers",
        p50,
        p99,
        f"{computed} computations in {args.runs} rounds (want {args.runs})",
    )
    console.print(cached)
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
