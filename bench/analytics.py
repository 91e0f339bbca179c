"""Benchmark of the analytics rollups: what an incremental refresh costs next to a full rebuild, at scale.

    .venv/bin/python bench/analytics.py [--orders 5000000] [--customers 500000] [--products 5000] [--months 24]
                                        [--new-orders 1000] [--timezone UTC] [--database-url postgresql://...]

A scratch database on the server of --database-url (default: $DATABASE_URL, else the local server), migrated, seeded
with db.seed (parallel load, which builds the rollups in its transaction) and analyzed, dropped at the end. Then, on
one connection as a worker would use it: the full rebuild of each family over full tables (the repair), 1,000 new
orders with their items (one transaction each, as a shop writes them; and again with the triggers off, for their
cost), the incremental refresh of each family with its ratio to the rebuild, a refresh with nothing to do, and late
changes spread over the whole history (which may exceed the share past which a refresh rebuilds). Needs a superuser
(session_replication_role) on the scratch server.

Each row of the table comes from one function in ROWS, which gets the shared `Bench` and returns its rows: add a
function there for another measurement (dashboard cache latency, exports, ...).
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/analytics.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
# (which asyncio's thread pool imports): put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from decimal import Decimal  # noqa: E402

import asyncpg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queries.views import Family, RefreshOutcome, rebuild, refresh_family  # noqa: E402
from db.seed import seed  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
TARGET = 0.01  # an incremental refresh after 1,000 orders: at most 1 % of the full rebuild


@dataclass
class Row:
    step: str
    work: str  # what the step did (rows, hours, days, buckets)
    seconds: float
    ratio: float | None = None  # seconds / the family's full rebuild


@dataclass
class Bench:
    args: argparse.Namespace
    url: str
    conn: asyncpg.Connection
    console: Console
    rebuild_seconds: dict[Family, float] = field(default_factory=dict)  # the faster of first build and repair


def _server(url: str) -> str:
    """The URL without its database name (postgresql://user@host:port)."""
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _work(outcome: RefreshOutcome) -> str:
    written = sum(v.upserted for v in outcome.views)
    deleted = sum(v.deleted for v in outcome.views)
    scope = f"{outcome.hours:,} hours" if outcome.family == "realtime" else f"{outcome.days:,} days"
    mode = "" if outcome.mode == "incremental" else f" [{outcome.reason}]"
    return f"{outcome.buckets:,} buckets → {scope}; {written:,} rows written, {deleted:,} deleted{mode}"


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


async def seed_row(bench: Bench) -> list[Row]:
    a = bench.args
    bench.console.print(f"seeding {a.orders:,} orders …")
    summary = await seed(
        bench.conn, customers=a.customers, products=a.products, orders=a.orders, months=a.months, seed=42,
        progress=not a.quiet, dsn=bench.url,
    )  # fmt: skip
    tick = time.perf_counter()
    await bench.conn.execute("ANALYZE")  # a live database has statistics; a fresh load has none until autovacuum
    analyzed = time.perf_counter() - tick
    rollups = summary.timings.get("rollups", 0.0)
    work = f"{summary.orders:,} orders, {summary.order_items:,} items"
    return [
        Row("seed: parallel load", work, summary.seconds - rollups),
        Row("seed: rollups built in the load's transaction", "both families, tables empty", rollups),
        Row("ANALYZE", "", analyzed),
    ]


async def rebuild_rows(bench: Bench) -> list[Row]:
    """Each family rebuilt over full tables (the repair: delete and insert): the baseline of the ratios."""
    rows = []
    for family in Family:
        bench.console.print(f"rebuilding {family.value} …")
        outcome = await rebuild(bench.conn, family, timezone=bench.args.timezone)
        bench.rebuild_seconds[family] = outcome.seconds
        written = sum(v.upserted for v in outcome.views)
        rows.append(Row(f"full rebuild {family.value} (repair)", f"{written:,} rows rewritten", outcome.seconds))
    await bench.conn.execute("ANALYZE mv_hourly_sales_metrics, mv_daily_sales_summary, mv_daily_product_sales, "
                             "mv_daily_category_sales, rollup_customer_first_orders")  # fmt: skip
    return rows


_NEW_ORDER = """
WITH o AS (
    INSERT INTO orders (customer_id, status, total_amount, created_at)
    VALUES ($1, 'paid', $2, now()) RETURNING id, created_at)
INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, created_at)
SELECT o.id, l.n, l.product_id, 1, l.price, o.created_at
  FROM o, unnest($3::bigint[], $4::numeric[]) WITH ORDINALITY AS l (product_id, price, n)"""


async def _insert_orders(bench: Bench, count: int, offset: int) -> float:
    """`count` orders of 1-3 items at now(), one transaction each; returns the seconds."""
    a = bench.args
    started = time.perf_counter()
    for k in range(offset, offset + count):
        lines = 1 + k % 3
        products = [1 + (k * 7919 + j * 104729) % a.products for j in range(lines)]
        prices = [Decimal(5 + (k * 31 + j) % 200) + Decimal("0.99") for j in range(lines)]
        async with bench.conn.transaction():
            await bench.conn.execute(_NEW_ORDER, 1 + (k * 2654435761) % a.customers, sum(prices), products, prices)
    return time.perf_counter() - started


async def new_orders_rows(bench: Bench) -> list[Row]:
    """1,000 orders without change capture (session_replication_role = replica skips triggers; removed again),
    then 1,000 with it: what the triggers add to a write."""
    n = bench.args.new_orders
    await bench.conn.execute("SET session_replication_role = replica")
    try:
        plain = await _insert_orders(bench, n, 10_000_000)
        await bench.conn.execute("DELETE FROM order_items WHERE created_at > now() - interval '1 hour' AND "
                                 "order_id > (SELECT max(id) FROM orders) - $1", n)  # fmt: skip
        await bench.conn.execute("DELETE FROM orders WHERE id > (SELECT max(id) FROM orders) - $1", n)
    finally:
        await bench.conn.execute("SET session_replication_role = DEFAULT")
    captured = await _insert_orders(bench, n, 0)
    per_order_ms = (captured - plain) / n * 1000
    return [
        Row(f"insert {n:,} orders + items, triggers off", "one transaction each", plain),
        Row(f"insert {n:,} orders + items, change capture on", f"{per_order_ms:+.2f} ms per order", captured),
    ]


async def _refresh_row(bench: Bench, family: Family, label: str) -> Row:
    outcome = await refresh_family(bench.conn, family, timezone=bench.args.timezone)
    ratio = outcome.seconds / bench.rebuild_seconds[family]
    return Row(f"incremental {family.value}: {label}", _work(outcome), outcome.seconds, ratio)


async def incremental_rows(bench: Bench) -> list[Row]:
    n = bench.args.new_orders
    return [await _refresh_row(bench, family, f"after {n:,} new orders") for family in Family]


async def idle_rows(bench: Bench) -> list[Row]:
    return [await _refresh_row(bench, family, "nothing pending") for family in Family]


async def late_change_rows(bench: Bench) -> list[Row]:
    """Up to 1,000 orders spread evenly over the whole history cancelled in one statement: nearly every one is its
    own bucket and hour, so the refresh costs what those hours and days hold, not what the orders hold."""
    n = bench.args.new_orders
    await bench.conn.execute(
        """UPDATE orders SET status = 'cancelled'
            WHERE id IN (SELECT 1 + (g * 104729) % (SELECT max(id) FROM orders) FROM generate_series(1, $1) g)
              AND status <> 'cancelled'""",
        n,
    )
    return [await _refresh_row(bench, family, f"{n:,} late cancellations over the history") for family in Family]


ROWS: list[Callable[[Bench], Awaitable[list[Row]]]] = [
    seed_row,
    rebuild_rows,
    new_orders_rows,
    incremental_rows,
    idle_rows,
    late_change_rows,
]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


async def _bench(args: argparse.Namespace, console: Console) -> list[Row]:
    server = _server(args.database_url)
    name = f"salesdash_bench_analytics_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    rows: list[Row] = []
    try:
        url = f"{server}/{name}"
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(url)
        try:
            bench = Bench(args, url, conn, console)
            for measure in ROWS:
                for row in await measure(bench):
                    ratio = "" if row.ratio is None else f"  ({row.ratio:.2%} of the rebuild)"
                    console.print(f"  {row.step}: {row.seconds:.3f} s  {row.work}{ratio}")
                    rows.append(row)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return rows


def _table(args: argparse.Namespace, rows: list[Row]) -> Table:
    title = (
        f"analytics rollups: {args.orders:,} orders, {args.customers:,} customers, {args.products:,} products, "
        f"{args.months} months, days in {args.timezone}"
    )
    table = Table(
        title=title, caption=f"target: an incremental refresh after 1,000 orders ≤ {TARGET:.0%} of the rebuild"
    )
    for column, justify in (("step", "left"), ("work", "left"), ("seconds", "right"), ("vs full rebuild", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2%}"
        table.add_row(row.step, row.work, f"{row.seconds:.3f}", ratio)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=5_000_000)
    parser.add_argument("--customers", type=int, default=500_000)
    parser.add_argument("--products", type=int, default=5_000)
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--new-orders", type=int, default=1_000)
    parser.add_argument("--timezone", default="UTC", help="the store's timezone: the daily rollups' days")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log file: keep each row on one line
    rows = asyncio.run(_bench(args, console))
    console.print(_table(args, rows))
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
