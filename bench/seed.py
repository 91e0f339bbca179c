"""Benchmark of `salesdash seed`: a scratch database, the migrations, one (or more) seeds, a table.

    .venv/bin/python bench/seed.py [--orders 1000000] [--customers 100000] [--products 2000] [--months 24]
                                   [--runs 1] [--serial] [--database-url postgresql://postgres@127.0.0.1:5432]

The scratch database is created on the server of --database-url (default: $DATABASE_URL, else the local
server) and dropped at the end. Later runs replace the data of the first (TRUNCATE in the same transaction).
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/seed.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
# (which asyncio's thread pool imports): put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import asyncpg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.seed import SeedSummary, seed  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _server(url: str) -> str:
    """The URL without its database name (postgresql://user@host:port)."""
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


async def _bench(args: argparse.Namespace, console: Console) -> list[SeedSummary]:
    server = _server(args.database_url)
    name = f"salesdash_bench_seed_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    summaries: list[SeedSummary] = []
    try:
        url = f"{server}/{name}"
        started = time.perf_counter()
        await asyncio.to_thread(upgrade, url)
        console.print(f"scratch database {name}: migrated in {time.perf_counter() - started:.1f}s")
        conn = await asyncpg.connect(url)
        try:
            for _ in range(args.runs):
                summaries.append(
                    await seed(
                        conn, customers=args.customers, products=args.products, orders=args.orders,
                        months=args.months, seed=args.seed, progress=not args.quiet,
                        parallel=False if args.serial else None, dsn=url,
                    )
                )  # fmt: skip
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--products", type=int, default=2_000)
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=1, help="seed this many times (later runs replace the data)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--serial", action="store_true", help="one connection, one transaction (no staging tables)")
    args = parser.parse_args()
    console = Console()
    summaries = asyncio.run(_bench(args, console))

    title = f"salesdash seed: {args.customers:,} customers, {args.products:,} products, {args.months} months"
    table = Table(title=title)
    for column in ("run", "orders", "items", "seconds", "orders/s", "items/s"):
        table.add_column(column, justify="right")
    for run, summary in enumerate(summaries, 1):
        table.add_row(
            str(run), f"{summary.orders:,}", f"{summary.order_items:,}", f"{summary.seconds:.2f}",
            f"{summary.orders_per_second:,.0f}", f"{summary.items_per_second:,.0f}",
        )  # fmt: skip
    console.print(table)

    phases = Table(title="where the time goes (s)", caption="'generate' runs on a worker thread, overlapping the COPY")
    phases.add_column("phase")
    for run in range(1, len(summaries) + 1):
        phases.add_column(f"run {run}", justify="right")
    for phase in summaries[0].timings:
        phases.add_row(phase, *(f"{s.timings.get(phase, 0.0):.2f}" for s in summaries))
    console.print(phases)
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
