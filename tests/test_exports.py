"""The exports domain: `export_analytics_data` run by real workers writes NDJSON, CSV and Parquet files that hold
exactly the orders of the range, `GET /exports/{task_id}` streams them, bad input enqueues nothing, a worker killed
mid-export leaves no file under the final name, and `prune_exports` removes old and abandoned files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from db.queries.exports import copy_lines
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.conftest import arq_burst, wait_for
from tests.test_api import TRIGGER, gql, queue_snapshot
from worker import client, registry
from worker.exportfiles import is_temp

Row = tuple[int, int, str, Decimal, datetime, int, int]
FORMATS = ("json", "csv", "parquet")
MEDIA_TYPES = {
    "json": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}

# Written independently of db/queries/exports.py: correlated subqueries instead of its join and GROUP BY.
EXPECTED_ROWS = """
SELECT o.id, o.customer_id, o.status, o.total_amount, o.created_at,
       (SELECT count(*) FROM order_items i WHERE i.order_id = o.id AND i.created_at = o.created_at),
       (SELECT coalesce(sum(quantity), 0) FROM order_items i WHERE i.order_id = o.id AND i.created_at = o.created_at)
  FROM orders o WHERE o.created_at >= $1 AND o.created_at < $2 ORDER BY o.id"""


def exports_dir() -> Path:
    return get_settings().exports_dir


@pytest.fixture(scope="module")
async def window(db: asyncpg.Pool) -> tuple[datetime, datetime]:
    """Seeded orders, and a range that starts and ends inside them (so both bounds cut)."""
    from db.seed import seed

    async with db.acquire() as conn:
        await seed(conn, customers=300, products=40, orders=3_000, months=3, seed=11, progress=False)
    first, last = await db.fetchrow("SELECT min(created_at), max(created_at) FROM orders")
    start = (first + timedelta(days=10)).replace(minute=0, second=0, microsecond=0)
    end = (last - timedelta(days=10)).replace(minute=0, second=0, microsecond=0)
    return start, end


async def expected_rows(db: asyncpg.Pool, start: datetime, end: datetime) -> list[Row]:
    return [tuple(r) for r in await db.fetch(EXPECTED_ROWS, start, end)]


async def direct_count(db: asyncpg.Pool, start: datetime, end: datetime) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM orders WHERE created_at >= $1 AND created_at < $2", start, end)
    return count


def _row(values: dict[str, Any]) -> Row:
    created = values["created_at"]
    if isinstance(created, str):
        assert "T" in created and created.endswith("+00:00"), created  # ISO 8601, in UTC
    return (
        int(values["id"]),
        int(values["customer_id"]),
        values["status"],
        Decimal(str(values["total_amount"])),
        created if isinstance(created, datetime) else datetime.fromisoformat(created),
        int(values["item_count"]),
        int(values["units"]),
    )


def parse_back(path: Path, export_format: str) -> list[Row]:
    if export_format == "json":
        objects = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(isinstance(o["total_amount"], str) for o in objects)  # exact, never a float
        return [_row(o) for o in objects]
    if export_format == "csv":
        return [_row(line) for line in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))]
    import pyarrow.parquet as pq

    return [_row(line) for line in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
async def exported(
    window: tuple[datetime, datetime], redis: Redis, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> dict[str, str]:
    """One export per format, enqueued over REST and run by one real `arq worker.analytics.Settings --burst`."""
    await redis.flushdb()
    start, end = window
    ids = {}
    for export_format in FORMATS:
        kwargs = {"start_date": start.isoformat(), "end_date": end.isoformat(), "export_format": export_format}
        body = {"task_name": "export_analytics_data", "kwargs": kwargs}
        accepted = await app_client.post("/jobs", json=body, headers=auth["trigger"])
        assert accepted.status_code == 202, accepted.text
        ids[export_format] = accepted.json()["task_id"]
    run = arq_burst("analytics")
    assert run.returncode == 0, run.stdout + run.stderr
    return ids


async def _result(app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], task_id: str) -> dict[str, Any]:
    status = (await app_client.get(f"/jobs/{task_id}", headers=auth["read"])).json()
    assert status["status"] == "complete", status
    return status["result"]


@pytest.mark.parametrize("export_format", FORMATS)
async def test_each_format_holds_exactly_the_orders_of_the_range(
    export_format: str,
    exported: dict[str, str],
    window: tuple[datetime, datetime],
    db: asyncpg.Pool,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
) -> None:
    result = await _result(app_client, auth, exported[export_format])
    count = await direct_count(db, *window)
    assert 0 < count < await db.fetchval("SELECT count(*) FROM orders")  # the range cuts: not everything
    assert result["rows"] == count
    assert result["format"] == export_format
    path = Path(result["path"])
    assert path.parent == exports_dir().resolve() and path.name.startswith(f"orders-{exported[export_format]}.")
    rows = parse_back(path, export_format)
    assert len(rows) == count
    assert rows == await expected_rows(db, *window)


@pytest.mark.parametrize("export_format", FORMATS)
async def test_result_size_and_sha256_are_the_file_and_the_download_streams_it(
    export_format: str, exported: dict[str, str], app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    task_id = exported[export_format]
    result = await _result(app_client, auth, task_id)
    content = Path(result["path"]).read_bytes()
    assert result["bytes"] == len(content)
    assert result["sha256"] == hashlib.sha256(content).hexdigest()

    async with app_client.stream("GET", f"/exports/{task_id}", headers=auth["read"]) as response:
        assert response.status_code == 200
        downloaded = b"".join([chunk async for chunk in response.aiter_raw()])
    assert downloaded == content
    assert response.headers["content-type"] == MEDIA_TYPES[export_format]
    filename = Path(result["path"]).name
    assert response.headers["content-disposition"] == f'attachment; filename="{filename}"'
    assert (await app_client.get(f"/exports/{task_id}")).status_code == 401


async def test_download_answers_404_and_409_when_there_is_no_file(
    window: tuple[datetime, datetime],
    exported: dict[str, str],
    db: asyncpg.Pool,
    redis: Redis,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
) -> None:
    assert (await app_client.get("/exports/0123456789abcdef", headers=auth["read"])).status_code == 404
    other = await client.enqueue_task(redis, OPERATOR, "refresh_all_materialized_views")
    not_export = await app_client.get(f"/exports/{other.task_id}", headers=auth["read"])
    assert not_export.status_code == 404 and "not an export" in not_export.text

    start, end = window
    queued = await client.enqueue_task(redis, OPERATOR, "export_analytics_data", [start.isoformat(), end.isoformat()])
    pending = await app_client.get(f"/exports/{queued.task_id}", headers=auth["read"])
    assert pending.status_code == 409 and "queued" in pending.text
    await client.abort_job(redis, db, OPERATOR, queued.task_id)
    aborted = await app_client.get(f"/exports/{queued.task_id}", headers=auth["read"])
    assert aborted.status_code == 404 and "aborted" in aborted.text

    gone = exports_dir() / f"orders-{exported['csv']}.csv"
    moved = gone.with_name("moved-away.csv")
    gone.rename(moved)
    try:
        missing = await app_client.get(f"/exports/{exported['csv']}", headers=auth["read"])
        assert missing.status_code == 404 and "gone" in missing.text
    finally:
        moved.rename(gone)


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"start_date": "2026-02-01", "end_date": "2026-01-01"}, "end_date"),  # end before start
    ({"start_date": "2026-01-01", "end_date": "2026-01-01"}, "end_date"),  # empty range
    ({"start_date": "2026-01-01", "end_date": "2026-02-01", "export_format": "xml"}, "export_format"),
    ({"start_date": "2024-01-01", "end_date": "2026-01-01"}, "SALESDASH_EXPORT_MAX_DAYS"),  # 731 days
    ({"start_date": "2026-13-01", "end_date": "2027-01-01"}, "start_date"),
    ({"start_date": "2026-01-01", "end_date": "next tuesday"}, "end_date"),
    ({"start_date": "2026-01-01"}, "end_date"),  # missing
    ({"start_date": "2026-01-01", "end_date": "2026-02-01", "format": "csv"}, "format"),  # not a field
]


async def test_bad_input_is_refused_naming_the_field_and_nothing_is_enqueued(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    before = await queue_snapshot(clean_redis)
    for kwargs, field in BAD_INPUTS:
        body = await gql(app_client, TRIGGER, auth["trigger"], name="export_analytics_data", kwargs=kwargs, priority=5)
        result = body["data"]["triggerBackgroundTask"]
        assert result["success"] is False and result["taskId"] is None, kwargs
        assert field in result["message"], (field, result["message"])
        rest = await app_client.post(
            "/jobs", json={"task_name": "export_analytics_data", "kwargs": kwargs}, headers=auth["trigger"]
        )
        assert rest.status_code == 422 and field in rest.json()["detail"], (kwargs, rest.text)
    assert await queue_snapshot(clean_redis) == before


async def test_parquet_without_pyarrow_says_how_to_install_it(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "parquet_available", lambda: False)
    before = await queue_snapshot(clean_redis)
    kwargs = {"start_date": "2026-01-01", "end_date": "2026-02-01", "export_format": "parquet"}
    response = await app_client.post(
        "/jobs", json={"task_name": "export_analytics_data", "kwargs": kwargs}, headers=auth["trigger"]
    )
    assert response.status_code == 422
    assert "export_format" in response.json()["detail"] and "pip install 'salesdash[parquet]'" in response.text
    assert await queue_snapshot(clean_redis) == before


async def test_dates_are_local_midnight_in_the_configured_timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALESDASH_TIMEZONE", "America/New_York")
    get_settings.cache_clear()
    try:
        bound = registry.get_task("export_analytics_data").validate(["2026-01-01", "2026-01-02T12:00:00Z"], {})
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert bound["start_date"] == "2026-01-01T00:00:00-05:00"
    assert bound["end_date"] == "2026-01-02T12:00:00Z"
    assert bound["export_format"] == "json"


async def test_ndjson_lines_leave_the_server_byte_for_byte(db: asyncpg.Pool) -> None:
    """A text value with a backslash, a quote, a newline and a control character: JSON escapes them once, and
    COPY must add nothing (its text format would double the backslashes)."""
    tricky = 'back\\slash "quote"\nnew line\x01'
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    async with db.acquire() as conn:
        rows = await copy_lines(conn, "SELECT concat('{\"status\":', to_json($1::text), '}')", tricky, sink=sink)
    lines = b"".join(chunks).decode().splitlines()
    assert rows == 1 and len(lines) == 1
    assert json.loads(lines[0]) == {"status": tricky}


async def test_a_second_run_of_the_same_job_replaces_its_file(
    window: tuple[datetime, datetime], db: asyncpg.Pool, redis: Redis
) -> None:
    from worker.jobs.exports import export_analytics_data

    ctx = {"db": db, "redis": redis, "settings": get_settings(), "job_id": "same-job-twice"}
    first = await export_analytics_data(ctx, start_date=window[0], end_date=window[1], export_format="csv")
    final = Path(first["path"])
    final.write_bytes(b"a half-written leftover")  # what a first run could have left
    second = await export_analytics_data(ctx, start_date=window[0], end_date=window[1], export_format="csv")
    assert second["path"] == first["path"] and second["sha256"] == first["sha256"]
    assert hashlib.sha256(final.read_bytes()).hexdigest() == first["sha256"]
    assert sorted(p.name for p in exports_dir().glob("*same-job-twice*")) == [final.name]  # no partial file left


async def test_a_worker_killed_mid_export_leaves_no_file_under_the_final_name(
    window: tuple[datetime, datetime],
    db: asyncpg.Pool,
    clean_redis: Redis,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
    spawn_worker: Callable[..., Any],
) -> None:
    start, end = window
    job = await client.enqueue_task(
        clean_redis, OPERATOR, "export_analytics_data", [start.isoformat(), end.isoformat()]
    )
    final = exports_dir() / f"orders-{job.task_id}.ndjson"
    worker = spawn_worker("worker.analytics.Settings", extra_env={"SALESDASH_EXPORT_PAUSE_MS": "3000"})

    async def partial_file() -> list[Path]:
        return [p for p in exports_dir().glob(f".orders-{job.task_id}.*") if p.stat().st_size > 0]

    (temp,) = await wait_for(partial_file, timeout=60, interval=0.05)  # the worker paused after its first chunk
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "in_progress" and status.progress is not None and "orders" in status.progress.message
    assert (await app_client.get(f"/exports/{job.task_id}", headers=auth["read"])).status_code == 409

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    assert not final.exists()
    assert temp.exists() and is_temp(temp.name)

    from worker.jobs.exports import prune_exports

    ctx = {"settings": get_settings()}
    assert (await prune_exports(ctx))["partial_deleted"] == 0  # it might still be written: it is kept for now
    two_hours_ago = time.time() - 2 * 3600  # longer than the export's time limit: no run can still write it
    os.utime(temp, (two_hours_ago, two_hours_ago))
    assert (await prune_exports(ctx))["partial_deleted"] == 1
    assert not temp.exists()


async def test_prune_exports_removes_old_exports_and_abandoned_partial_files(
    db: asyncpg.Pool, clean_redis: Redis
) -> None:
    directory = exports_dir()
    directory.mkdir(parents=True, exist_ok=True)
    days_ago = {
        "orders-old.csv": 8,  # past the 7-day retention
        "orders-older.ndjson": 30,
        "orders-recent.parquet": 6,
        ".orders-dead.csv.0123456789ab.part": 1,  # abandoned by a killed run
        ".orders-live.csv.ba9876543210.part": 0,  # being written now
        "notes.txt": 30,  # not an export: never touched
    }
    for name, age in days_ago.items():
        path = directory / name
        path.write_bytes(b"x")
        moment = time.time() - age * 86400
        os.utime(path, (moment, moment))

    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_exports")
    run = arq_burst("maintenance")
    assert run.returncode == 0, run.stdout + run.stderr
    status = await client.job_status(clean_redis, db, job.task_id)
    assert status.status == "complete", status
    assert status.result == {"deleted": 2, "partial_deleted": 1, "older_than_days": 7}
    left = {p.name for p in directory.iterdir()}
    assert {"orders-recent.parquet", ".orders-live.csv.ba9876543210.part", "notes.txt"} <= left
    assert not {"orders-old.csv", "orders-older.ndjson", ".orders-dead.csv.0123456789ab.part"} & left
