"""What an unauthenticated oversized GraphQL request costs the API (issue 10): the 10,000-alias `backgroundTasks`
query without a token (about 300 KB), one at a time, and `/healthz` idle and during a burst of such requests sent
by another process, against one `uvicorn api.main:app` process (one event loop).

    .venv/bin/python bench/api_refusal.py [--attackers 10] [--probes 50]
                                          [--database-url postgresql://postgres@127.0.0.1:5432]
                                          [--redis-url redis://127.0.0.1:6379/15]

A scratch database is created (and dropped) on the server of --database-url; nothing is written to Redis.
tests/test_api_errors.py asserts the bounds of the issue on the same requests (< 100 ms, /healthz < 50 ms).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # bench/queue.py shadows `queue`
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from tests.api_server import api_server  # noqa: E402
from tests.test_api_errors import BURST, aliases  # noqa: E402

HEADERS = {"Content-Type": "application/json"}


async def timed(send: object, n: int, pause: float = 0.0) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await send()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
        await asyncio.sleep(pause)
    return samples


async def measure(base: str, attackers: int, probes: int) -> list[tuple[str, list[float], str]]:
    payload = json.dumps({"query": aliases(10_000)}).encode()
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        refused = await timed(lambda: c.post("/graphql", content=payload, headers=HEADERS), probes)
        idle = await timed(lambda: c.get("/healthz"), probes)
        attack = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BURST, base, str(attackers), stdout=asyncio.subprocess.PIPE
        )
        assert attack.stdout is not None
        assert await attack.stdout.readline() == b"under way\n"
        burst = await timed(lambda: c.get("/healthz"), probes, pause=0.03)
        attack.terminate()
        out, _ = await attack.communicate()
    return [
        (f"10,000-alias query, no token ({len(payload) // 1000} KB), one at a time", refused, ""),
        ("/healthz, idle", idle, ""),
        (f"/healthz during a burst ({attackers} clients sending that query)", burst, f"{int(out)} refused meanwhile"),
    ]


async def main(args: argparse.Namespace) -> None:
    name = f"salesdash_bench_refusal_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{args.database_url}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{args.database_url}/{name}"
        await asyncio.to_thread(upgrade, url)
        async with api_server(env={"DATABASE_URL": url, "REDIS_URL": args.redis_url}) as base:
            rows = await measure(base, args.attackers, args.probes)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    table = Table(title=f"unauthenticated GraphQL refusals, one uvicorn process; load average {os.getloadavg()[0]:.1f}")
    for column in ("request", "median ms", "p95 ms", "n", "note"):
        table.add_column(column)
    for label, samples, note in rows:
        p95 = sorted(samples)[int(0.95 * (len(samples) - 1))]
        table.add_row(label, f"{statistics.median(samples) * 1000:.1f}", f"{p95 * 1000:.1f}", str(len(samples)), note)
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attackers", type=int, default=10)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    asyncio.run(main(parser.parse_args()))
