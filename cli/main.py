"""`salesdash`, the operator CLI (docs/cli.md). Commands that print data take `--json` for machine-readable output."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from salesdash.connections import database_url, open_db_pool, open_redis

app = typer.Typer(help="Sales Dashboard background jobs: run, inspect and operate.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
T = TypeVar("T")


def _run(work: Callable[[asyncpg.Pool, Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        db = await open_db_pool(max_size=2)
        redis = await open_redis()
        try:
            return await work(db, redis)
        finally:
            await redis.aclose(close_connection_pool=True)
            await db.close()

    return asyncio.run(main())


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return str(value)


def _emit(data: Any, as_json: bool, columns: list[str] | None = None, title: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, default=_default, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(_default(value))


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _parse_json(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        _fail(f"--{what} is not valid JSON: {exc}")
    if not isinstance(parsed, kind):
        _fail(f"--{what} must be a JSON {'array' if kind is list else 'object'}")
    return parsed


# ---- setup ---------------------------------------------------------------------------------------------------
@app.command()
def migrate() -> None:
    """Apply database migrations (safe to run again)."""
    from db.migrate import upgrade

    upgrade()
    console.print("migrations applied")


@app.command()
def seed(
    customers: Annotated[int, typer.Option(help="Customers to create.")] = 10_000,
    products: Annotated[int, typer.Option(help="Products to create.")] = 500,
    orders: Annotated[int, typer.Option(help="Orders to create (with 1–5 items each).")] = 100_000,
    months: Annotated[int, typer.Option(help="Months of history, ending now.")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same data.")] = 42,
    as_json: JsonOpt = False,
) -> None:
    """Replace the demo data (customers, products, orders, order items), bulk loaded with COPY."""
    from db.seed import seed as run_seed

    async def work(db: asyncpg.Pool, _: Redis) -> Any:
        async with db.acquire() as conn:
            return await run_seed(
                conn,
                customers=customers,
                products=products,
                orders=orders,
                months=months,
                dsn=database_url(),
                seed=seed,
                progress=not as_json,
            )

    try:
        summary = _run(work)
    except ValueError as exc:
        _fail(str(exc))
    data = dataclasses.asdict(summary)
    if not as_json:
        data.pop("timings", None)
    if not as_json:
        data["orders_per_s"] = round(summary.orders / summary.seconds) if summary.seconds else None
    _emit(data, as_json, title="seeded")


# ---- tokens --------------------------------------------------------------------------------------------------
@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what the token is for.")],
    scope: Annotated[str, typer.Option(help="read, trigger or admin.")] = "read",
    expires_in: Annotated[
        str | None, typer.Option(help="Expire after this long: 90m, 12h, 30d, 2w (default: never).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; it is printed once and only its hash is stored."""
    from db.queries.tokens import create_token
    from salesdash.periods import parse_duration

    try:
        lifetime = parse_duration(expires_in) if expires_in is not None else None
        token_id, token = _run(lambda db, _: create_token(db, name, scope, lifetime))
    except ValueError as exc:
        _fail(str(exc))
    expires = (datetime.now(UTC) + lifetime).isoformat(timespec="seconds") if lifetime else None
    if as_json:
        _emit({"id": token_id, "name": name, "scope": scope, "expires_at": expires, "token": token}, True)
    else:
        console.print(f"token {token_id} ({scope}) for {name}, expires {expires or 'never'}:\n{token}")
        console.print("[dim]store it now: it is not shown again[/dim]")


@token_app.command("list")
def token_list(as_json: JsonOpt = False) -> None:
    """List tokens with their last use and expiry (never the tokens themselves). Last use is recorded by each API
    process about once a minute."""
    from db.queries.tokens import list_tokens

    _emit(
        _run(lambda db, _: list_tokens(db)),
        as_json,
        ["id", "name", "scopes", "active", "created_at", "last_used_at", "expires_at", "revoked_at"],
    )


@token_app.command("revoke")
def token_revoke(token_id: int, as_json: JsonOpt = False) -> None:
    """Revoke a token by id."""
    from db.queries.tokens import revoke_token

    revoked = _run(lambda db, _: revoke_token(db, token_id))
    if not revoked:
        _fail(f"no active token with id {token_id}")
    _emit({"id": token_id, "revoked": True}, as_json)


# ---- jobs ----------------------------------------------------------------------------------------------------
@app.command()
def call(
    task: str,
    args: Annotated[str | None, typer.Option("--args", help="Positional arguments as a JSON array.")] = None,
    kwargs: Annotated[str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = None,
    priority: Annotated[int, typer.Option(help="0–9, 9 runs first.")] = 5,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result; exit 1 if the job failed.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue a task by name."""
    from worker import client, jobstore
    from worker.records import JobStatus
    from worker.registry import UnknownTaskError

    parsed_args = _parse_json(args, "args", list)
    parsed_kwargs = _parse_json(kwargs, "kwargs", dict)

    async def work(db: asyncpg.Pool, redis: Redis) -> tuple[Any, JobStatus | None]:
        job = await client.enqueue_task(redis, OPERATOR, task, parsed_args, parsed_kwargs, priority, notify_done=wait)
        if not wait:
            return job, None
        await jobstore.wait_done(redis, job.task_id, timeout)  # on timeout the status says where it is
        return job, await client.job_status(redis, db, job.task_id)

    try:
        job, status = _run(work)
    except (UnknownTaskError, ValueError) as exc:
        _fail(str(exc))
    if status is None:
        _emit(
            {"task_id": job.task_id, "task_name": job.task_name, "queue": job.queue, "priority": job.priority}, as_json
        )
        return
    _emit(
        status.model_dump(mode="json", exclude=None if as_json else {"traceback"}),
        as_json,
        ["task_id", "task_name", "status", "result", "error", "tries"],
    )
    if status.status != "complete":
        raise typer.Exit(1)


@app.command()
def result(task_id: str, as_json: JsonOpt = False) -> None:
    """Show a job's status and result."""
    from worker import client

    try:
        status = _run(lambda db, redis: client.job_status(redis, db, task_id))
    except client.JobNotFoundError as exc:
        _fail(str(exc), 1)
    if as_json:
        _emit(status.model_dump(mode="json"), True)
        return
    for key, value in status.model_dump().items():
        if value is not None:
            console.print(f"[bold]{key}[/bold]: {_cell(value)}")


@app.command()
def retry(task_id: str, as_json: JsonOpt = False) -> None:
    """Run a failed job again."""
    from worker import client
    from worker.registry import UnknownTaskError

    try:
        job = _run(lambda db, redis: client.retry_job(redis, db, OPERATOR, task_id))
    except (client.JobNotFoundError, client.JobStateError, UnknownTaskError, ValueError) as exc:
        _fail(str(exc), 1)  # ValueError: the stored arguments no longer fit the task
    _emit({"task_id": job.task_id, "retry_of": task_id, "task_name": job.task_name}, as_json)


@app.command()
def purge(
    queue: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Drop every waiting job of a queue (running jobs finish)."""
    from worker import client
    from worker.registry import Queue

    if queue not in {q.value for q in Queue}:  # before the prompt: never ask to confirm what cannot be done
        _fail(f"unknown queue {queue!r}; queues: {', '.join(q.value for q in Queue)}")
    if not yes and not typer.confirm(f"drop every waiting job of {queue}?"):
        raise typer.Exit(1)
    removed = _run(lambda _, redis: client.purge_queue(redis, OPERATOR, queue))
    _emit({"queue": queue, "removed": removed}, as_json)


@app.command()
def inspect(
    what: Annotated[str, typer.Argument(help="active, scheduled, registered, stats or queues")],
    as_json: JsonOpt = False,
) -> None:
    """Look into the running system, like `celery inspect`."""
    from worker.inspect import INSPECTORS

    inspector = INSPECTORS.get(what)
    if inspector is None:
        _fail(f"unknown inspect target {what!r}; choose from {', '.join(INSPECTORS)}")
        return
    rows, columns = _run(inspector)
    _emit(rows, as_json, columns, title=what)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address.")] = "127.0.0.1",
    api_workers: Annotated[
        int | None, typer.Option(help="API processes (default SALESDASH_API_WORKERS, 1); one per core is usual.")
    ] = None,
) -> None:
    """Run everything on this machine: servers (embedded unless configured), migrations, demo data, API and
    one worker per queue. Ctrl-C stops it all."""
    from cli.up import run_up

    settings = get_settings()
    workers = settings.api_workers if api_workers is None else api_workers
    if not 1 <= workers <= 64:
        _fail("--api-workers must be between 1 and 64")
    sys.exit(run_up(settings, host, port, workers))


@app.command()
def worker(
    queue: str,
    processes: Annotated[int, typer.Option(help="Worker processes to run.")] = 1,
    max_tasks_per_child: Annotated[int, typer.Option(help="Replace a process after this many jobs (0: never).")] = 0,
    max_memory_per_child: Annotated[
        int, typer.Option(help="Replace a process above this resident memory in KiB (0: never).")
    ] = 0,
) -> None:
    """Supervise worker processes for one queue: restart dead ones, recycle after N jobs or above a memory limit."""
    from cli.supervisor import supervise
    from worker.registry import Queue

    if queue not in {q.value for q in Queue}:
        _fail(f"unknown queue {queue!r}; queues: {', '.join(q.value for q in Queue)}")
    if processes < 1:
        _fail("--processes must be at least 1")
    sys.exit(supervise(queue, processes, max_tasks_per_child, max_memory_per_child))


if __name__ == "__main__":
    app()
