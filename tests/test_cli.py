"""The operator CLI, run as a real process like an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import ROOT, wait_for
from worker import client, jobstore


def salesdash(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_token_lifecycle() -> None:
    created = salesdash("token", "create", "--name", "ci-bot", "--scope", "trigger", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)
    assert token["token"].startswith("sd_") and token["scope"] == "trigger"
    listed = json.loads(salesdash("token", "list", "--json").stdout)
    mine = [t for t in listed if t["id"] == token["id"]]
    assert mine and mine[0]["scopes"] == ["trigger"] and "token" not in mine[0]  # the secret is never listed
    assert salesdash("token", "revoke", str(token["id"]), "--json").returncode == 0
    again = salesdash("token", "revoke", str(token["id"]))
    assert again.returncode != 0 and "no active token" in again.stderr
    bad = salesdash("token", "create", "--name", "x", "--scope", "root")
    assert bad.returncode == 2 and "unknown scope 'root'" in bad.stderr


async def test_call_wait_result_inspect_and_purge(clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any) -> None:
    spawn_worker("worker.analytics.Settings")
    called = salesdash("call", "refresh_realtime_materialized_views", "--priority", "8", "--wait", "--json")
    assert called.returncode == 0, called.stderr
    status = json.loads(called.stdout)
    assert status["status"] == "complete" and status["priority"] == 8
    assert status["result"]["views"][0]["view"] == "mv_hourly_sales_metrics"

    shown = json.loads(salesdash("result", status["task_id"], "--json").stdout)
    assert shown["task_id"] == status["task_id"] and shown["status"] == "complete"

    unknown = salesdash("call", "no_such_task")
    assert unknown.returncode == 2 and "unknown task 'no_such_task'" in unknown.stderr
    bad_json = salesdash("call", "refresh_all_materialized_views", "--kwargs", "[1]")
    assert bad_json.returncode == 2 and "JSON object" in bad_json.stderr

    registered = json.loads(salesdash("inspect", "registered", "--json").stdout)
    assert {"refresh_all_materialized_views", "refresh_daily_materialized_views"} <= {
        r["task"] for r in registered if r["queue"] == "analytics"
    }
    queues = {q["queue"]: q for q in json.loads(salesdash("inspect", "queues", "--json").stdout)}
    assert queues["analytics"]["workers"] >= 1

    for _ in range(3):
        await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history", defer_seconds=600)
    scheduled = json.loads(salesdash("inspect", "scheduled", "--json").stdout)
    # the running analytics worker's cron may have put its next warm_dashboard_cache among them too
    deferred = [s for s in scheduled if s["status"] == "deferred" and s["queue"] == "maintenance"]
    assert [s["task_name"] for s in deferred] == ["prune_job_history"] * 3
    purged = json.loads(salesdash("purge", "maintenance", "--yes", "--json").stdout)
    assert purged == {"queue": "maintenance", "removed": 3}
    assert await jobstore.queue_counts(clean_redis, "maintenance") == {"queued": 0, "deferred": 0, "in_progress": 0}
    assert salesdash("purge", "nope", "--yes").returncode == 2


async def test_call_wait_exits_non_zero_when_the_job_fails(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    spawn_worker("worker.notifications.Settings")
    await db.execute("ALTER TABLE notifications RENAME TO notifications_away")
    try:
        called = salesdash("call", "send_daily_summary", "--wait", "--json")
    finally:
        await db.execute("ALTER TABLE notifications_away RENAME TO notifications")
    assert called.returncode == 1
    status = json.loads(called.stdout)
    assert status["status"] == "failed" and "notifications" in status["error"]
    retried = salesdash("retry", status["task_id"], "--json")
    assert retried.returncode == 0
    new_id = json.loads(retried.stdout)["task_id"]
    final = await wait_for(lambda: _final(clean_redis, db, new_id), timeout=20)
    assert final["status"] == "complete"


async def _final(redis: Redis, db: asyncpg.Pool, job_id: str) -> dict[str, Any] | None:
    status = (await client.job_status(redis, db, job_id)).model_dump()
    return status if status["status"] in ("complete", "failed") else None
