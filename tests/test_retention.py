"""The retention domain: `prune_old_records` deletes exactly the rows older than each table's retention, in bounded
batches (one DELETE statement per batch, counted by a statement trigger), and a second run deletes nothing. In a
private database: the job deletes across whole tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from salesdash.config import Settings
from tests.conftest import arq_burst
from tests.private_db import private_database, settings_for
from worker import client
from worker.jobs import retention

DAYS = {"reports": 400, "notifications": 30, "customer_segment_history": 60}
OLD_NOTIFICATIONS = 2_500  # sent or failed, older than 30 days
BATCH = 1_000


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with private_database("salesdash_test_retention") as url:
        yield url


# Every table gets rows just inside and just outside its retention; `keep` marks the ones that must stay.
_SEED = [
    # reports: by period_end (a date), 400 days
    """INSERT INTO reports (kind, period_start, period_end, payload)
       SELECT 'monthly', d - 27, d, jsonb_build_object('keep', d >= current_date - 400)
         FROM unnest(ARRAY[current_date - 800, current_date - 401, current_date - 400, current_date - 10]) AS d""",
    # notifications: sent/failed ones older than 30 days go; pending ones stay whatever their age
    """INSERT INTO notifications (kind, subject, body, dedupe_key, status, created_at, payload)
       SELECT 'test', 's', 'b', 'old-' || g, CASE WHEN g % 3 = 0 THEN 'failed' ELSE 'sent' END,
              now() - interval '31 days' - g * interval '1 minute', '{"keep": false}'
         FROM generate_series(1, 2500) AS g""",
    """INSERT INTO notifications (kind, subject, body, dedupe_key, status, created_at, payload)
       SELECT 'test', 's', 'b', 'kept-' || g, CASE WHEN g <= 5 THEN 'pending' ELSE 'sent' END,
              CASE WHEN g <= 5 THEN now() - interval '90 days' ELSE now() - interval '29 days' END, '{"keep": true}'
         FROM generate_series(1, 20) AS g""",
    # segment history: 60 days
    """INSERT INTO customer_segment_history (customer_id, from_segment, to_segment, changed_at)
       SELECT g, 'new', 'loyal', now() - (CASE WHEN g % 2 = 0 THEN 61 ELSE 59 END) * interval '1 day'
         FROM generate_series(1, 300) AS g""",
    # one row per DELETE statement on notifications, with the rows it deleted
    "CREATE TABLE delete_statements (rows bigint NOT NULL)",
    """CREATE FUNCTION count_deleted() RETURNS trigger LANGUAGE plpgsql AS $fn$
       BEGIN INSERT INTO delete_statements SELECT count(*) FROM gone; RETURN NULL; END $fn$""",
    """CREATE TRIGGER count_deleted AFTER DELETE ON notifications REFERENCING OLD TABLE AS gone
       FOR EACH STATEMENT EXECUTE FUNCTION count_deleted()""",
]


@pytest.fixture(scope="module")
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    assert pool is not None
    for statement in _SEED:
        await pool.execute(statement)
    yield pool
    await pool.close()


def _ctx(database: str, pool: asyncpg.Pool) -> dict[str, Any]:
    settings = settings_for(
        database,
        report_retention_days=DAYS["reports"],
        notification_retention_days=DAYS["notifications"],
        segment_history_retention_days=DAYS["customer_segment_history"],
    )
    return {"db": pool, "settings": settings}


# Each table's rows by what identifies them (segment history: one row per customer at a time, 300 customers)
_KEYS = {"reports": "id", "notifications": "id", "customer_segment_history": "customer_id"}


async def _survivors(pool: asyncpg.Pool) -> dict[str, set[int]]:
    return {table: {r[0] for r in await pool.fetch(f"SELECT {key} FROM {table}")} for table, key in _KEYS.items()}


async def _expected_survivors(pool: asyncpg.Pool) -> dict[str, set[int]]:
    """Worked out from the seeded rows, not from the job's conditions."""
    return {
        "reports": {r["id"] for r in await pool.fetch("SELECT id FROM reports WHERE (payload->>'keep')::boolean")},
        "notifications": {
            r["id"] for r in await pool.fetch("SELECT id FROM notifications WHERE (payload->>'keep')::boolean")
        },
        "customer_segment_history": {
            r["customer_id"]
            for r in await pool.fetch("SELECT customer_id FROM customer_segment_history WHERE customer_id % 2 = 1")
        },
    }


async def test_old_rows_go_in_bounded_batches_and_the_rest_stay(
    database: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH_ROWS", BATCH)
    expected = await _expected_survivors(pool)
    before = await _survivors(pool)
    result = await retention.prune_old_records(_ctx(database, pool))
    by_table = {t["table"]: t for t in result["tables"]}
    assert {t: by_table[t]["deleted"] for t in DAYS} == {t: len(before[t] - expected[t]) for t in DAYS}
    assert by_table["notifications"]["deleted"] == OLD_NOTIFICATIONS
    assert by_table["reports"]["deleted"] == 2 and by_table["customer_segment_history"]["deleted"] == 150
    assert await _survivors(pool) == expected
    # 2,500 rows at 1,000 a statement: three statements, the last one finding fewer than a batch ends the loop
    statements = [r["rows"] for r in await pool.fetch("SELECT rows FROM delete_statements")]
    assert statements == [1000, 1000, 500] and by_table["notifications"]["batches"] == 3
    assert {t: by_table[t]["retention_days"] for t in DAYS} == DAYS


async def test_a_second_run_deletes_nothing(database: str, pool: asyncpg.Pool) -> None:
    before = await _survivors(pool)
    result = await retention.prune_old_records(_ctx(database, pool))
    assert [t["deleted"] for t in result["tables"]] == [0, 0, 0]
    assert await _survivors(pool) == before


async def test_the_task_runs_on_a_real_maintenance_worker(
    database: str, pool: asyncpg.Pool, clean_redis: Redis
) -> None:
    """Default retentions (1095, 90, 730 days) from the worker's own settings: of two history rows either side of
    730 days, the older goes; nothing else left is that old."""
    await pool.execute(
        """INSERT INTO customer_segment_history (customer_id, from_segment, to_segment, changed_at)
           VALUES (-1, 'new', 'loyal', now() - interval '731 days'),
                  (-2, 'new', 'loyal', now() - interval '729 days')"""
    )
    job = await client.enqueue_task(clean_redis, OPERATOR, "prune_old_records")
    run = arq_burst("maintenance", extra_env={"DATABASE_URL": database})
    assert run.returncode == 0, run.stdout + run.stderr
    status = await client.job_status(clean_redis, pool, job.task_id)
    assert status.status == "complete", status
    tables = {t["table"]: t for t in status.result["tables"]}
    assert tables["customer_segment_history"]["deleted"] == 1
    assert tables["customer_segment_history"]["retention_days"] == 730
    assert await pool.fetchval("SELECT array_agg(customer_id) FROM customer_segment_history WHERE customer_id < 0") == [
        -2
    ]


@pytest.mark.parametrize(
    "variable",
    [
        "SALESDASH_REPORT_RETENTION_DAYS",
        "SALESDASH_NOTIFICATION_RETENTION_DAYS",
        "SALESDASH_SEGMENT_HISTORY_RETENTION_DAYS",
    ],
)
def test_a_retention_below_one_day_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "0")
    with pytest.raises(ValidationError, match=variable):
        Settings()
