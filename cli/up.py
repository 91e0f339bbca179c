"""`salesdash up`: the whole system on one machine, stopped as a whole by Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from aiosmtpd.controller import Controller
from rich.console import Console

from cli.mailsink import start_mail_sink
from salesdash.config import Settings
from salesdash.embedded import resolve_urls, stop_started

console = Console()

DEMO = {"customers": 2_000, "products": 200, "orders": 20_000, "months": 12, "seed": 42}
QUEUES = ("analytics", "maintenance", "notifications")
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal of `make run` closed


class _Stopped(BaseException):
    """A stop signal during start-up. BaseException: no `except Exception` on the way may swallow it."""


def _die_with_parent() -> None:
    # children get SIGTERM if `up` itself is killed outright, so none is left behind
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


UP_TOKEN_PREFIX = "salesdash up "


async def _prepare(database_url: str, timezone: str) -> tuple[bool, int, str]:
    """Seed demo data when the database is empty (the loader rebuilds the analytics rollups), bring the rollups up to
    date otherwise (a database migrated from the materialized views gets them rebuilt here, not at the first cron
    tick), and mint an admin token for this run, revoking any an earlier run left behind (it was killed before
    it could revoke its own)."""
    from db.queries.tokens import create_token, revoke_tokens_named
    from db.queries.views import Family, refresh_family
    from db.seed import seed
    from salesdash.connections import open_db_pool

    db = await open_db_pool(max_size=2)
    try:
        seeded = False
        async with db.acquire() as conn:
            if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM orders)"):
                await seed(
                    conn,
                    progress=True,
                    customers=DEMO["customers"],
                    products=DEMO["products"],
                    orders=DEMO["orders"],
                    months=DEMO["months"],
                    seed=DEMO["seed"],
                    dsn=database_url,
                )
                seeded = True
            for family in Family:
                await refresh_family(conn, family, timezone=timezone)
        await revoke_tokens_named(db, UP_TOKEN_PREFIX)
        token_id, token = await create_token(db, f"{UP_TOKEN_PREFIX}{time.strftime('%Y-%m-%d %H:%M:%S')}", "admin")
        return seeded, token_id, token
    finally:
        await db.close()


async def _revoke(token_id: int) -> None:
    from db.queries.tokens import revoke_token
    from salesdash.connections import open_db_pool

    db = await open_db_pool(max_size=1)
    try:
        await revoke_token(db, token_id)
    finally:
        await db.close()


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=os.environ.copy(), start_new_session=True, preexec_fn=_die_with_parent)


def _api_command(host: str, port: int, api_workers: int) -> list[str]:
    """uvicorn with `api_workers` processes sharing the port (its own supervisor restarts one that dies)."""
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host, "--port", str(port), "--no-access-log"]
    return command + (["--workers", str(api_workers)] if api_workers > 1 else [])


def run_up(settings: Settings, host: str, port: int, api_workers: int = 1) -> int:
    stopping = False
    starting = True

    def request_stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping, starting
        stopping = True
        if starting:
            # abort the start step under way (initdb, migrations, seeding, a lock wait) rather than finish
            # it first; only once, so the cleanup below is never interrupted
            starting = False
            raise _Stopped

    # without a handler SIGHUP would end us at once: no cleanup, embedded servers left running
    for sig in _STOP_SIGNALS:
        signal.signal(sig, request_stop)
    children: list[subprocess.Popen[bytes]] = []
    token_id: int | None = None
    sink: Controller | None = None
    try:
        database_url, redis_url = resolve_urls(settings)
        console.print(f"PostgreSQL: {database_url}\nRedis:      {redis_url}")
        from db.migrate import upgrade

        upgrade(database_url)
        seeded, token_id, token = asyncio.run(_prepare(database_url, settings.timezone))
        if seeded:
            console.print(f"seeded demo data: {DEMO}")
        if settings.smtp_host is None:
            sink = start_mail_sink(settings.mail_dir)
            console.print(f"mail:       no SMTP server configured; mails go to {settings.mail_dir} (Maildir)")
        children.append(_spawn(_api_command(host, port, api_workers)))
        children += [_spawn([sys.executable, "-m", "worker", q]) for q in QUEUES]
        base = f"http://{host}:{port}"
        console.print(
            f"[bold green]salesdash is up[/bold green]\n  API      {base}\n  GraphQL  {base}/graphql\n"
            f"  health   {base}/healthz\n  metrics  {base}/metrics\n"
            f"  API processes: {api_workers}\n"
            f"  admin token (this run): {token}\n  (revoked when this run stops)\nCtrl-C stops everything."
        )
        starting = False
        return _watch(children, lambda: stopping)
    except _Stopped:
        return 0
    finally:
        starting = False
        _stop(children)
        if token_id is not None:
            with contextlib.suppress(Exception):  # the next run revokes it if this cannot
                asyncio.run(_revoke(token_id))
        if sink is not None:
            sink.stop()
        stop_started()  # the embedded servers we started, or adopted from a run that died without stopping them
        with contextlib.suppress(OSError):  # after SIGHUP the terminal is gone
            console.print("stopped")


def _watch(children: list[subprocess.Popen[bytes]], stopping: Callable[[], bool]) -> int:
    """Until a stop is asked for (0), or a child exits (1)."""
    while not stopping():
        if any(child.poll() is not None for child in children):
            console.print("[red]a child process exited; stopping[/red]")
            return 1
        time.sleep(0.3)
    return 0


def _stop(children: list[subprocess.Popen[bytes]], timeout_s: float = 40) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
