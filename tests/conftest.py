"""Test servers: the machine's PostgreSQL and Redis when DATABASE_URL/REDIS_URL are set, else the embedded
ones (as on a fresh machine). Either way the suite gets its own scratch database and Redis db, so it never
touches real data, and worker subprocesses inherit the same settings through the environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg2
import pytest
import redis as sync_redis
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
TEST_REDIS_DB = int(os.environ.get("SALESDASH_TEST_REDIS_DB", "9"))  # two runs at once: give each its own


def _server_urls() -> tuple[str, str]:
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        os.environ.setdefault("SALESDASH_DATA_DIR", str(Path(tempfile.gettempdir()) / "salesdash-test-servers"))
        from salesdash.embedded import resolve_urls

        resolve_urls()
    return os.environ["DATABASE_URL"], os.environ["REDIS_URL"]


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _with_redis_db(url: str, db: int) -> str:
    base = url.split("?", 1)[0]
    head, _, tail = base.rpartition("/")
    return f"{head}/{db}" if tail.isdigit() or tail == "" else f"{base}/{db}"


def pytest_configure(config: pytest.Config) -> None:
    """Runs before test modules import the project, so every cached setting sees the test servers."""
    server_db_url, server_redis_url = _server_urls()
    name = f"salesdash_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(_with_database(server_db_url, "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    os.environ["DATABASE_URL"] = _with_database(server_db_url, name)
    os.environ["REDIS_URL"] = _with_redis_db(server_redis_url, TEST_REDIS_DB)
    os.environ["SALESDASH_DATA_DIR"] = tempfile.mkdtemp(prefix="salesdash-test-data-")
    config.stash[_DB_NAME] = (server_db_url, name)
    from salesdash.config import get_settings

    get_settings.cache_clear()
    from db.migrate import upgrade

    upgrade(os.environ["DATABASE_URL"])
    sync_redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()


def pytest_unconfigure(config: pytest.Config) -> None:
    server_db_url, name = config.stash.get(_DB_NAME, (None, None))
    if not name or not server_db_url:
        return
    admin = psycopg2.connect(_with_database(server_db_url, "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


_DB_NAME = pytest.StashKey[tuple[str, str]]()


@pytest.fixture(scope="session")
async def db() -> AsyncIterator[asyncpg.Pool]:
    from salesdash.connections import open_db_pool

    pool = await open_db_pool(max_size=5)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def redis() -> AsyncIterator[Redis]:
    from salesdash.connections import open_redis

    client = await open_redis()
    yield client
    await client.aclose(close_connection_pool=True)


@pytest.fixture
async def clean_redis(redis: Redis) -> Redis:
    await redis.flushdb()
    return redis


@pytest.fixture(scope="session")
async def app_client(db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    from api.main import create_app

    app = create_app()
    app.state.db, app.state.redis = db, redis  # share the session's pools instead of the lifespan's
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def _token(db: asyncpg.Pool, scope: str) -> str:
    from db.queries.tokens import create_token

    return (await create_token(db, f"test-{scope}", scope))[1]


@pytest.fixture(scope="session")
async def tokens(db: asyncpg.Pool) -> dict[str, str]:
    return {scope: await _token(db, scope) for scope in ("read", "trigger", "admin")}


@pytest.fixture(scope="session")
def auth(tokens: dict[str, str]) -> dict[str, dict[str, str]]:
    return {scope: {"Authorization": f"Bearer {token}"} for scope, token in tokens.items()}


def arq_burst(
    queue: str, timeout: float = 120, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `arq worker.<queue>.Settings --burst` as a real process and return its output."""
    return subprocess.run(
        [sys.executable, "-m", "arq", f"worker.{queue}.Settings", "--burst"],
        cwd=ROOT,
        env={**os.environ, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Any]:
    """Start long-running worker processes (any Settings path); output goes to `proc.log_path` (a file, so a
    chatty worker never blocks on a full pipe). All are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        settings_path: str, extra_env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"worker-{len(procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "arq", settings_path, *(args or [])],
                cwd=ROOT,
                env={**os.environ, **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def enqueue_job(
    redis: Redis,
    task: str,
    queue: str,
    kwargs: dict[str, Any] | None = None,
    *,
    priority: int = 5,
    job_id: str | None = None,
    defer_ms: int = 0,
    notify: bool = False,
) -> str:
    """Put a job straight into Redis, past the task table (test tasks live on test queues)."""
    from worker import jobstore
    from worker.records import JobPayload

    now = jobstore.now_ms()
    job = JobPayload(
        job_id or jobstore.new_job_id(), task, [], kwargs or {}, queue, priority, now, now + defer_ms, notify=notify
    )
    assert await jobstore.enqueue(redis, job)
    return job.id


async def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
