"""Benchmark of the analytics rollups: what an incremental refresh costs next to a full rebuild, at scale.

    .venv/bin/python bench/analytics.py [--orders 5000000] [--customers 500000] [--products 5000] [--months 24]
                                        [--new-orders 1000] [--timezone UTC] [--database-url postgresql://...]
                                        [--export-rows 1000000] [--clients 100] [--keep-database NAME]

A scratch database on the server of --database-url (default: $DATABASE_URL, else the local server), migrated, seeded
with db.seed (parallel load, which builds the rollups in its transaction) and analyzed, dropped at the end
(--keep-database NAME keeps it, and a later run with the same NAME reuses it without seeding). Then, on one
connection as a worker would use it: the full rebuild of each family over full tables (the repair), 1,000 new orders
with their items (one transaction each, as a shop writes them; and again with the triggers off, for their cost), the
incremental refresh of each family with its ratio to the rebuild, a refresh with nothing to do, and late changes
spread over the whole history (which may exceed the share past which a refresh rebuilds). Then
`export_analytics_data` of the newest --export-rows orders as CSV and NDJSON, each in a worker process of its own.
Last, `salesOverview` served from the cache by real API processes (uvicorn --workers 1 and 2) to wrk
(bench/wrk_graphql.lua; `make bench-analytics` installs wrk with apt-get when it is missing): one client, then
--clients connections back to back (closed loop) and paced (each one request every 100 ms): p50 and p99. Needs a
superuser (session_replication_role) on the scratch server, and a Redis db of its own for the cache and the export
jobs (--redis-url; flushed).

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
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from decimal import Decimal  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queries.views import Family, RefreshOutcome, rebuild, refresh_family  # noqa: E402
from db.seed import seed  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
TARGET = 0.01  # an incremental refresh after 1,000 orders: at most 1 % of the full rebuild
P99_TARGET_MS = 10  # salesOverview from the cache at 100 concurrent clients
_ROOT = os.path.dirname(_HERE)


@dataclass
class Row:
    step: str
    work: str  # what the step did (rows, hours, days, buckets)
    seconds: float
    ratio: float | None = None  # seconds / the family's full rebuild
    target: str = ""  # the target for the row, and whether it is met


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


async def _insert_uncaptured(bench: Bench, n: int, offset: int) -> float:
    """`n` orders with the triggers off (session_replication_role = replica), removed again the same way."""
    await bench.conn.execute("SET session_replication_role = replica")
    try:
        seconds = await _insert_orders(bench, n, offset)
        await bench.conn.execute("DELETE FROM order_items WHERE created_at > now() - interval '1 hour' AND "
                                 "order_id > (SELECT max(id) FROM orders) - $1", n)  # fmt: skip
        await bench.conn.execute("DELETE FROM orders WHERE id > (SELECT max(id) FROM orders) - $1", n)
    finally:
        await bench.conn.execute("SET session_replication_role = DEFAULT")
    return seconds


async def new_orders_rows(bench: Bench) -> list[Row]:
    """The 1,000 orders the refreshes below pick up, written between two runs without change capture: what the
    triggers add to a write, next to how much two runs without them differ."""
    n = bench.args.new_orders
    before = await _insert_uncaptured(bench, n, 10_000_000)
    captured = await _insert_orders(bench, n, 0)
    after = await _insert_uncaptured(bench, n, 20_000_000)
    overhead_ms = (captured - min(before, after)) / n * 1000
    noise_ms = abs(before - after) / n * 1000
    return [
        Row(f"insert {n:,} orders + items, triggers off (twice)", "one transaction each", min(before, after)),
        Row(
            f"insert {n:,} orders + items, change capture on",
            f"{overhead_ms:+.3f} ms per order (runs without it differ by {noise_ms:.3f} ms)",
            captured,
        ),  # fmt: skip
    ]


async def _refresh_row(bench: Bench, family: Family, label: str) -> Row:
    outcome = await refresh_family(bench.conn, family, timezone=bench.args.timezone)
    ratio = outcome.seconds / bench.rebuild_seconds[family]
    return Row(f"incremental {family.value}: {label}", _work(outcome), outcome.seconds, ratio)


async def incremental_rows(bench: Bench) -> list[Row]:
    n = bench.args.new_orders
    rows = [await _refresh_row(bench, family, f"after {n:,} new orders") for family in Family]
    for row in rows:
        row.target = f"≤ {TARGET:.0%} of the rebuild {'✓' if row.ratio is not None and row.ratio <= TARGET else '✗'}"
    return rows


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


_OVERVIEW = '{ salesOverview(range: "last_7_days") { revenue orders generatedAt } }'
_WRK_SCRIPT = os.path.join(_HERE, "wrk_graphql.lua")


@dataclass(frozen=True)
class Load:
    """One wrk run against the API: `connections` clients, back to back or each pausing `pace_ms` between
    requests, for `seconds`."""

    api_processes: int
    connections: int
    pace_ms: int = 0
    seconds: int = 10

    @property
    def label(self) -> str:
        clients = f"{self.connections} client{'s' if self.connections > 1 else ''}"
        mode = f"each 1 request / {self.pace_ms} ms" if self.pace_ms else "back to back"
        return f"{self.api_processes} API process{'es' if self.api_processes > 1 else ''}, {clients} {mode}"


def _loads(clients: int) -> list[Load]:
    return [Load(1, 1, seconds=5), Load(1, clients), Load(1, clients, pace_ms=100), Load(2, clients),
            Load(2, clients, pace_ms=100)]  # fmt: skip


async def overview_rows(bench: Bench) -> list[Row]:
    """`salesOverview` over HTTP from real API processes (uvicorn --workers N), served from the cache: wrk
    (bench/wrk_graphql.lua) with --clients connections over loopback, back to back (closed loop: each client sends
    its next request when the last one is answered) and paced (each client one request every 100 ms, so the
    offered rate is fixed while the server keeps up)."""
    from db.queries.tokens import create_token

    _, token = await create_token(bench.conn, "bench analytics", "read")
    redis.Redis.from_url(bench.args.redis_url).flushdb()  # the bench's own db: no stale cache entry
    rows: list[Row] = []
    for processes in sorted({load.api_processes for load in _loads(bench.args.clients)}):
        with _api(bench, processes) as base:
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
                await _until_up(http)
                for _ in range(2 * processes):  # the first call computes and caches the payload; the rest are hits
                    await _overview(http)
            for load in _loads(bench.args.clients):
                if load.api_processes == processes:
                    rows.append(await asyncio.to_thread(_wrk, base, token, load))
    return rows


@contextmanager
def _api(bench: Bench, processes: int) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": bench.url, "REDIS_URL": bench.args.redis_url,
           "SALESDASH_TIMEZONE": bench.args.timezone, "SALESDASH_LOG_LEVEL": "WARNING"}  # fmt: skip
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--no-access-log", "--log-level",
         "warning", "--workers", str(processes)], cwd=_ROOT, env=env)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        api.terminate()
        api.wait(10)


def _wrk(base: str, token: str, load: Load) -> Row:
    env = {**os.environ, "SALESDASH_BENCH_TOKEN": token, "SALESDASH_BENCH_PACE_MS": str(load.pace_ms),
           "SALESDASH_BENCH_BODY": json.dumps({"query": _OVERVIEW})}  # fmt: skip
    threads = min(2, load.connections)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(load.connections), "-d", f"{load.seconds}s", "--timeout", "10s",
         "-s", _WRK_SCRIPT, f"{base}/graphql"], env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, errors, p50_us, p99_us, max_us, run_us = map(int, line.split()[1:])
    if errors:
        raise RuntimeError(f"wrk: {errors} of {requests} requests failed\n{out}")
    rate = requests / (run_us / 1e6)
    work = f"{rate:,.0f} requests/s; p50 {p50_us / 1000:.2f} ms, p99 {p99_us / 1000:.2f} ms, max {max_us / 1000:.1f} ms"
    ok = "✓" if p99_us / 1000 < P99_TARGET_MS else "✗"
    return Row(f"salesOverview over HTTP, p99: {load.label}", work, p99_us / 1e6, target=f"p99 < 10 ms {ok}")


async def _overview(http: httpx.AsyncClient) -> None:
    response = await http.post("/graphql", json={"query": _OVERVIEW})
    body = response.json()
    if response.status_code != 200 or body.get("errors"):
        raise RuntimeError(f"salesOverview failed: {response.status_code} {body}")


async def _until_up(http: httpx.AsyncClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the API did not come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def export_rows(bench: Bench) -> list[Row]:
    """`export_analytics_data` of the newest --export-rows orders as CSV and as NDJSON, each by a worker process of
    its own (`python -m worker analytics --burst`, as bench/exports.py runs it): rows/s is the job's own rows /
    seconds; the worker's peak RSS (VmHWM) covers its start and imports too."""
    from bench.exports import export_job
    from salesdash.config import get_settings

    start, end = await bench.conn.fetchrow(
        """SELECT min(created_at), max(created_at) + interval '1 second'
             FROM (SELECT created_at FROM orders ORDER BY created_at DESC LIMIT $1) newest""",
        bench.args.export_rows,
    )
    data_dir = tempfile.mkdtemp(prefix="salesdash-bench-analytics-")
    env = {**os.environ, "DATABASE_URL": bench.url, "REDIS_URL": bench.args.redis_url, "SALESDASH_DATA_DIR": data_dir,
           "SALESDASH_TIMEZONE": bench.args.timezone, "SALESDASH_LOG_LEVEL": "WARNING"}  # fmt: skip
    os.environ.update(env)  # this process validates and enqueues with the same settings
    get_settings.cache_clear()
    window = {"start_date": start.isoformat(), "end_date": end.isoformat()}
    rows = []
    try:
        async with asyncpg.create_pool(bench.url, min_size=1, max_size=2) as db:
            redis_client = aioredis.Redis.from_url(bench.args.redis_url)
            try:
                for export_format in ("csv", "json"):
                    r = await export_job(redis_client, db, env, {**window, "export_format": export_format})
                    rate, rss_mb = r["rows"] / r["seconds"], r["rss_kib"] / 1024
                    ok = "✓" if rate >= 200_000 and rss_mb < 300 else "✗"
                    work = f"{r['rows']:,} rows, {r['bytes'] / 1e6:,.0f} MB; {rate:,.0f} rows/s; worker peak RSS " \
                           f"{rss_mb:,.0f} MB"  # fmt: skip
                    target = f"≥ 200k rows/s, RSS < 300 MB {ok}"
                    rows.append(Row(f"export {'NDJSON' if export_format == 'json' else 'CSV'}", work, r["seconds"],
                                    target=target))  # fmt: skip
            finally:
                await redis_client.aclose()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


ROWS: list[Callable[[Bench], Awaitable[list[Row]]]] = [
    seed_row,
    rebuild_rows,
    new_orders_rows,
    incremental_rows,
    idle_rows,
    late_change_rows,
    export_rows,
    overview_rows,
]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


async def _bench(args: argparse.Namespace, console: Console) -> list[Row]:
    server = _server(args.database_url)
    name = args.keep_database or f"salesdash_bench_analytics_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    reused = bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    if not reused:
        await admin.execute(f'CREATE DATABASE "{name}"')
    rows: list[Row] = []
    try:
        url = f"{server}/{name}"
        await asyncio.to_thread(upgrade, url)
        conn = await asyncpg.connect(url)
        try:
            bench = Bench(args, url, conn, console)
            if reused:
                console.print(f"reusing {name} as seeded by an earlier run (--keep-database): no seed row")
            for measure in ROWS[1:] if reused else ROWS:
                if args.only and measure.__name__.removesuffix("_rows") not in args.only:
                    continue
                for row in await measure(bench):
                    ratio = "" if row.ratio is None else f"  ({row.ratio:.2%} of the rebuild)"
                    console.print(f"  {row.step}: {row.seconds:.3f} s  {row.work}{ratio}")
                    rows.append(row)
        finally:
            await conn.close()
    finally:
        if not args.keep_database:
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
    columns = (
        ("step", "left"),
        ("work", "left"),
        ("seconds", "right"),
        ("vs full rebuild", "right"),
        ("target", "left"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2%}"
        table.add_row(row.step, row.work, f"{row.seconds:.3f}", ratio, row.target)
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
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis db for the cache; flushed")
    parser.add_argument("--clients", type=int, default=100, help="concurrent salesOverview clients")
    parser.add_argument(
        "--keep-database", metavar="NAME", help="seed into this database and keep it; a later run reuses it as it is"
    )
    parser.add_argument(
        "--only", type=lambda v: v.split(","), help="with --keep-database: only these rows (e.g. export,overview)"
    )
    parser.add_argument("--export-rows", type=int, default=1_000_000, help="the newest orders exported")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log file: keep each row on one line
    rows = asyncio.run(_bench(args, console))
    console.print(_table(args, rows))
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
