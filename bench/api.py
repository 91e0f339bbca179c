"""Benchmark of the API's hot paths over loopback: `POST /jobs`, GraphQL `triggerBackgroundTask` and
`GET /jobs/{id}` at 100 concurrent connections driven by wrk (C, event-driven: not the bottleneck), next to a bare
arq `enqueue_job` loop and the job service's `enqueue_task` in this process, all in one run.

    .venv/bin/python bench/api.py [--seconds 10] [--connections 100] [--api-workers N (default: cores)]
                                  [--database-url postgresql://postgres@127.0.0.1:5432]
                                  [--redis-url redis://127.0.0.1:6379/15] [--api-root OTHER_CHECKOUT]
                                  [--compare-root OTHER_CHECKOUT [--rounds 5]]

A scratch database is created on the server of --database-url (tokens only) and dropped at the end; the
--redis-url database is emptied before and after (FLUSHDB): give it one no running system uses. The API runs as
`uvicorn api.main:app --workers N` with the trigger rate limit on but set out of reach, so its Lua runs on every
trigger. Each scenario is warmed up for 2 s before it is measured. --api-root serves another checkout with its own
.venv (e.g. the main branch before a change) against the same scratch database and Redis; --compare-root serves
both at once and runs each path on each in turn, 3 s at a time, so the machine's load falls on both alike.
"""

from __future__ import annotations

import os
import sys

# Run as `python bench/api.py`, bench/ would be sys.path[0] and bench/queue.py would shadow the stdlib `queue`
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from arq.connections import ArqRedis, RedisSettings, create_pool  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.queries.tokens import create_token  # noqa: E402
from salesdash.auth import Principal, Scope  # noqa: E402

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
ROOT = os.path.dirname(_HERE)
TASK = "refresh_all_materialized_views"
TRIGGER_QUERY = f'mutation {{ triggerBackgroundTask(taskName: "{TASK}") {{ success taskId }} }}'
TARGETS = {"POST /jobs": (1500, 100), "GraphQL triggerBackgroundTask": (1500, 100), "GET /jobs/{id}": (2500, None)}


@dataclass(frozen=True)
class Row:
    name: str
    per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int = 0  # wrk's connect, read, write errors and timeouts (2 s)
    cpu_ms: float | None = None  # CPU the API processes spent per request: what the machine's noise does not change
    cores: float | None = None  # how much CPU the API processes got meanwhile (2.0 = both cores all the time)


def _server(url: str) -> str:
    url = url.split("?", 1)[0].replace("postgresql+asyncpg://", "postgresql://")
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- wrk -----------------------------------------------------------------------------------------------------
def _wrk_script(method: str, headers: dict[str, str], body: str | None) -> str:
    lines = [f'wrk.method = "{method}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    return "\n".join(lines) + "\n"


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(text: str, percent: str) -> float:
    match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        raise RuntimeError(f"no {percent}% latency in wrk's output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _errors(text: str) -> tuple[int, int]:
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return (int(non_2xx.group(1)) if non_2xx else 0), (sum(map(int, sockets.groups())) if sockets else 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (uvicorn's workers)."""
    parent = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def run_wrk(
    name: str, url: str, script: str, seconds: int, connections: int, api_pid: int, *, warm_up: bool = True
) -> Row:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        base = ["wrk", "-t2", f"-c{connections}", "--latency", "-s", f.name, url]
        if warm_up:
            subprocess.run([*base[:3], "-d2s", *base[3:]], check=True, capture_output=True, text=True)
        cpu_before, began = cpu_seconds(api_pid), time.perf_counter()
        out = subprocess.run([*base[:3], f"-d{seconds}s", *base[3:]], check=True, capture_output=True, text=True)
        cpu, elapsed = cpu_seconds(api_pid) - cpu_before, time.perf_counter() - began
    finally:
        os.unlink(f.name)
    text = out.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not rate or not total:
        raise RuntimeError(f"wrk printed no rate:\n{text}\n{out.stderr}")
    latencies = _latency_ms(text, "50"), _latency_ms(text, "99")
    cpu_ms = cpu * 1000 / int(total.group(1))
    return Row(name, float(rate.group(1)), *latencies, *_errors(text), cpu_ms=cpu_ms, cores=cpu / elapsed)


# ---- in-process loops ----------------------------------------------------------------------------------------
async def run_loop(name: str, call: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> Row:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Row(name, len(latencies) / elapsed, ordered[len(ordered) // 2] * 1000, p99 * 1000, errors)


async def in_process_rows(redis_url: str, seconds: float, concurrency: int) -> list[Row]:
    from worker import client

    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(redis_url))
    trigger = Principal(frozenset({Scope.TRIGGER}))  # no token: no rate limit, as the CLI
    try:
        arq_row = await run_loop(
            "arq enqueue_job (this process)",
            lambda: redis.enqueue_job(TASK, _queue_name="bench:arq"),
            seconds,
            concurrency,
        )
        ours = await run_loop(
            "worker.client.enqueue_task (this process)",
            lambda: client.enqueue_task(redis, trigger, TASK),
            seconds,
            concurrency,
        )
    finally:
        await redis.aclose(close_connection_pool=True)
    return [arq_row, ours]


# ---- the API -------------------------------------------------------------------------------------------------
def start_api(database_url: str, redis_url: str, workers: int, port: int, root: str) -> subprocess.Popen[bytes]:
    """uvicorn serving the checkout at `root` (this one, or another, e.g. main before a change: --api-root)."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SALESDASH_TRIGGER_RATE_PER_MINUTE": "1e12",  # the limiter runs, but never refuses
        "SALESDASH_TRIGGER_BURST": "1000000000",
        "SALESDASH_LOG_LEVEL": "WARNING",
    }
    python = os.path.join(root, ".venv", "bin", "python") if root != ROOT else sys.executable
    command = [python, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    # wrk drops its connections mid-request when it stops; the API logs each as an error: keep that out of the table
    log = tempfile.NamedTemporaryFile("wb", prefix="bench-api-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(command, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the API did not come up within 60 s; its output is in {log.name}")


def scenarios(base: str, token: str) -> list[tuple[str, str, str]]:
    """(name, url, wrk script) of each measured path; GET asks for a job enqueued here."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    job = httpx.post(f"{base}/jobs", json={"task_name": TASK}, headers=auth, timeout=10)
    job.raise_for_status()
    return [
        ("POST /jobs", "/jobs", _wrk_script("POST", auth, json.dumps({"task_name": TASK}))),
        ("GraphQL triggerBackgroundTask", "/graphql", _wrk_script("POST", auth, json.dumps({"query": TRIGGER_QUERY}))),
        ("GET /jobs/{id}", f"/jobs/{job.json()['task_id']}", _wrk_script("GET", auth, None)),
    ]


def http_rows(base: str, token: str, seconds: int, connections: int, api_pid: int) -> list[Row]:
    return [
        run_wrk(name, base + path, script, seconds, connections, api_pid)
        for name, path, script in scenarios(base, token)
    ]


def interleaved(apis: list[tuple[str, int]], token: str, rounds: int, connections: int) -> list[list[str]]:
    """Each path on each API in turn, `rounds` times 3 s (after a warm-up round): the machine's load falls on
    both alike. One table row per path: per API, mean req/s, median p99, CPU ms/req and cores."""
    paths = scenarios(apis[0][0], token)
    table = []
    for name, path, script in paths:
        runs: list[list[Row]] = [[] for _ in apis]
        for round_no in range(rounds + 1):
            for i, (base, pid) in enumerate(apis):
                row = run_wrk(name, base + path, script, 3, connections, pid, warm_up=False)
                if round_no:
                    runs[i].append(row)
        cells = [name]
        for rows in runs:
            rate = sum(r.per_s for r in rows) / len(rows)
            cpu = sum((r.cpu_ms or 0) * r.per_s for r in rows) / sum(r.per_s for r in rows)
            p99 = statistics.median(r.p99_ms for r in rows)
            cells += [f"{rate:,.0f}", f"{p99:.0f}", f"{cpu:.2f}", f"{sum(r.cores or 0 for r in rows) / len(rows):.2f}"]
        table.append(cells)
    return table


def print_comparison(labels: list[str], rows: list[list[str]], rounds: int) -> None:
    table = Table(title=f"Interleaved, {rounds} rounds of 3 s per path and API (side by side, same load)")
    table.add_column("path")
    for label in labels:
        for what in ("req/s", "p99 ms", "CPU ms/req", "cores"):
            table.add_column(f"{label} {what}", justify="right")
    for cells in rows:
        table.add_row(*cells)
    Console(width=180).print(table)


async def create_database(server: str) -> str:
    name = f"salesdash_bench_api_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{server}/{name}"


async def admin_token(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        _, token = await create_token(conn, "bench api", "admin")
    finally:
        await conn.close()
    return token


async def drop_database(server: str, url: str) -> None:
    admin = await asyncpg.connect(f"{server}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


async def flush(redis_url: str) -> None:
    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        await redis.flushdb()
    finally:
        await redis.aclose(close_connection_pool=True)


def print_table(rows: list[Row], workers: int, connections: int, seconds: int) -> None:
    table = Table(title=f"API hot paths: {connections} connections, {seconds} s each, {workers} API processes")
    columns = ("path", "requests/s", "p50 ms", "p99 ms", "non-2xx", "socket errors", "API CPU ms/req", "API cores")
    columns += ("target", "met")
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        target = TARGETS.get(row.name)
        if target:
            rate, p99 = target
            wanted = f"≥ {rate:,}/s" + (f", p99 < {p99} ms" if p99 else "")
            fast = row.per_s >= rate and (p99 is None or row.p99_ms < p99)
            met = "yes" if fast and not row.non_2xx and not row.socket_errors else "no"
        else:
            wanted, met = "", ""
        numbers = [f"{row.per_s:,.0f}", f"{row.p50_ms:.1f}", f"{row.p99_ms:.1f}", str(row.non_2xx)]
        cpu = f"{row.cpu_ms:.2f}" if row.cpu_ms is not None else ""
        cores = f"{row.cores:.2f}" if row.cores is not None else ""
        table.add_row(row.name, *numbers, str(row.socket_errors), cpu, cores, wanted, met)
    console = Console(width=180)
    console.print(table)
    console.print(
        f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. API CPU ms/req is "
        "what a request costs whatever else runs: on otherwise idle cores, N API processes serve at most "
        "N × 1000 / it a second. API cores is the CPU they got meanwhile: well below N, the machine starved them."
    )


def compare(args: argparse.Namespace, url: str, token: str, ours: tuple[str, int]) -> None:
    other_port = _free_port()
    other = start_api(url, args.redis_url, args.api_workers, other_port, os.path.abspath(args.compare_root))
    labels = [os.path.basename(os.path.abspath(args.api_root)), os.path.basename(os.path.abspath(args.compare_root))]
    try:
        apis = [ours, (f"http://127.0.0.1:{other_port}", other.pid)]
        print_comparison(labels, interleaved(apis, token, args.rounds, args.connections), args.rounds)
    finally:
        other.terminate()
        other.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--api-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_SERVER))
    parser.add_argument("--api-root", default=ROOT, help="serve another checkout (its .venv) instead")
    parser.add_argument("--compare-root", help="also serve this checkout and compare the two, interleaved")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path (--compare-root)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make bench-api` installs it (apt-get install wrk)")
    server = _server(args.database_url)
    asyncio.run(flush(args.redis_url))
    url = asyncio.run(create_database(server))
    try:
        upgrade(url)
        token = asyncio.run(admin_token(url))
        port = _free_port()
        api = start_api(url, args.redis_url, args.api_workers, port, os.path.abspath(args.api_root))
        try:
            rows = http_rows(f"http://127.0.0.1:{port}", token, args.seconds, args.connections, api.pid)
            if args.compare_root:
                compare(args, url, token, (f"http://127.0.0.1:{port}", api.pid))
        finally:
            api.terminate()
            api.wait(30)
        rows += asyncio.run(in_process_rows(args.redis_url, min(args.seconds, 5), args.connections))
        print_table(rows, args.api_workers, args.connections, args.seconds)
    finally:
        asyncio.run(flush(args.redis_url))
        asyncio.run(drop_database(server, url))


if __name__ == "__main__":
    main()
