"""Benchmark of `generate_monthly_report`: a scratch database, the migrations, one seed, then the report of the
last full month, query by query and end to end, and the partitions each figure query reads.

    .venv/bin/python bench/reports.py [--orders 2000000] [--customers 100000] [--products 2000] [--months 24]
                                      [--runs 3] [--timezone UTC] [--database-url postgresql://postgres@127.0.0.1:5432]

The scratch database is created on the server of --database-url (default: $DATABASE_URL, else the local server)
and dropped at the end. Times are the median of --runs runs, warm cache.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/reports.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402
from zoneinfo import ZoneInfo  # noqa: E402

import asyncpg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queries import reports as q  # noqa: E402
from db.seed import seed  # noqa: E402
from salesdash.config import Settings  # noqa: E402
from salesdash.connections import open_db_pool  # noqa: E402
from salesdash.periods import Month  # noqa: E402
from worker.jobs.reports import generate_monthly_report, month_period  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
_PARTITION = re.compile(r"\bon (orders|order_items)_p(\d{4}_\d{2})\b")


def _server(url: str) -> str:
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


Step = Callable[[asyncpg.Connection, q.Period], Awaitable[Any]]
STEPS: dict[str, tuple[Step, str | None]] = {
    "figures (one month)": (q.period_figures, q._FIGURES),
    "daily revenue": (q.daily_revenue, q._DAILY),
    "top products": (q.top_products, q._TOP_PRODUCTS),
    "top categories": (q.top_categories, q._TOP_CATEGORIES),
    "segment mix": (q.segment_mix, q._SEGMENT_MIX),
}


async def _partitions_read(conn: asyncpg.Connection, sql: str, period: q.Period) -> str:
    """Which month partitions the plan touches (plan-time pruning with the job's parameters)."""
    args: list[Any] = [period.start, period.end, q.REVENUE_STATUSES]
    if sql is q._DAILY:
        args = [period.start, period.end, period.timezone, q.REVENUE_STATUSES, period.first_day, period.last_day]
    elif "$4" in sql:
        args.append(q.TOP_N)
    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
    months: dict[str, set[str]] = {}
    for table, month in _PARTITION.findall(plan):
        months.setdefault(table, set()).add(month.replace("_", "-"))
    return "; ".join(f"{table} {_span(sorted(m))}" for table, m in sorted(months.items(), reverse=True))


def _span(months: list[str]) -> str:
    return months[0] if len(months) == 1 else f"{months[0]} … {months[-1]} ({len(months)})"


async def _time(runs: int, call: Callable[[], Awaitable[Any]]) -> float:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


async def _measure(url: str, args: argparse.Namespace) -> tuple[list[tuple[str, float, str]], dict[str, Any]]:
    settings = Settings(DATABASE_URL=url, SALESDASH_TIMEZONE=args.timezone)
    pool = await open_db_pool(settings, max_size=2)
    try:
        month = Month.current(ZoneInfo(args.timezone)).plus(-1)
        period = month_period(month, args.timezone)
        rows = []
        async with pool.acquire() as conn:
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM orders WHERE created_at >= $1 AND created_at < $2) AS orders,"
                " (SELECT count(*) FROM order_items WHERE created_at >= $1 AND created_at < $2) AS items",
                period.start,
                period.end,
            )
            for name, (step, sql) in STEPS.items():
                seconds = await _time(args.runs, lambda step=step: step(conn, period))
                rows.append((name, seconds, await _partitions_read(conn, sql, period) if sql else ""))
        ctx = {"db": pool, "settings": settings}
        total = await _time(args.runs, lambda: generate_monthly_report(ctx, month=str(month)))
        rows.append(("whole job (3 months of figures, render, upsert)", total, ""))
        size = await pool.fetchval("SELECT length(html) FROM reports WHERE period_start = $1", month.first_day)
        return rows, {"month": str(month), **dict(counts), "html_bytes": size}
    finally:
        await pool.close()


async def _bench(args: argparse.Namespace, console: Console) -> tuple[list[tuple[str, float, str]], dict[str, Any]]:
    server = _server(args.database_url)
    name = f"salesdash_bench_reports_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{server}/{name}"
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(url)
        try:
            summary = await seed(
                conn, customers=args.customers, products=args.products, orders=args.orders, months=args.months,
                seed=42, progress=False, dsn=url,
            )  # fmt: skip
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
        console.print(f"scratch database {name}: {summary.orders:,} orders, {summary.order_items:,} items seeded")
        return await _measure(url, args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--products", type=int, default=2_000)
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    args = parser.parse_args()
    console = Console(width=130)
    rows, facts = asyncio.run(_bench(args, console))
    title = (
        f"generate_monthly_report {facts['month']} ({args.timezone}): {facts['orders']:,} orders and "
        f"{facts['items']:,} items in the month, {args.orders:,} orders over {args.months} months"
    )
    table = Table(title=title, caption=f"median of {args.runs} runs; page {facts['html_bytes']:,} bytes")
    table.add_column("step")
    table.add_column("ms", justify="right")
    table.add_column("partitions in the plan")
    for name, seconds, partitions in rows:
        table.add_row(name, f"{seconds * 1000:,.0f}", partitions)
    console.print(table)
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
