"""The alerts domain: `check_alerts` fires once on a task's failed-job rate, keeps quiet within the cooldown, reminds
after it, and sends a resolved message when the rate clears; it shares its alert state with `check_system_health`;
a misconfigured notification channel is named by the health check and at the worker's start."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from pydantic import SecretStr
from redis.asyncio import Redis

from salesdash.config import get_settings
from tests.conftest import wait_for
from tests.notify_servers import HOST, free_port
from worker.jobs.alerts import check_alerts
from worker.jobs.health import check_system_health

TASK = "export_analytics_data"
KEY = f"job_failures_{TASK}"


def job_ctx(db: Any, redis: Redis, **settings: Any) -> dict[str, Any]:
    return {"db": db, "redis": redis, "settings": get_settings().model_copy(update=settings)}


async def alerts_about(db: asyncpg.Pool, key: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT kind, subject FROM notifications WHERE dedupe_key LIKE 'alert%' AND payload->>'check' = $1 ORDER BY id",
        key,
    )
    return [(r["kind"], r["subject"]) for r in rows]


async def runs(db: asyncpg.Pool, status: str, count: int) -> None:
    await db.execute(
        """INSERT INTO job_runs (job_id, task_name, queue, status, enqueued_at, finished_at)
           SELECT $1 || g, $2, 'analytics', $3, now(), now() FROM generate_series(1, $4) AS g""",
        f"alert-test-{uuid.uuid4().hex[:8]}-",
        TASK,
        status,
        count,
    )


async def test_a_failing_task_alerts_once_reminds_after_the_cooldown_and_resolves(
    db: asyncpg.Pool, clean_redis: Redis
) -> None:
    await db.execute("DELETE FROM job_runs WHERE task_name = $1", TASK)
    await db.execute("DELETE FROM alert_state")
    await runs(db, "failed", 4)
    await runs(db, "complete", 2)  # 4 of 6 failed: over 20 %

    first = await check_alerts(job_ctx(db, clean_redis))
    assert KEY in first["failing"] and "queue_workers_analytics" in first["failing"]
    assert await alerts_about(db, KEY) == [("alert", f"Alert: {KEY}")]
    again = await check_alerts(job_ctx(db, clean_redis))
    assert KEY in again["failing"] and again["notifications"] == []  # within the cooldown: quiet

    # the health check sees the same worker-less queue: the shared alert state keeps it to one alert
    await check_system_health(job_ctx(db, clean_redis))
    assert len(await alerts_about(db, "queue_workers_analytics")) == 1

    await asyncio.sleep(0.05)
    await check_alerts(job_ctx(db, clean_redis, alert_cooldown_s=0.01))
    assert (await alerts_about(db, KEY))[-1] == ("alert", f"Still failing: {KEY}")

    await db.execute("UPDATE job_runs SET status = 'complete' WHERE task_name = $1", TASK)
    cleared = await check_alerts(job_ctx(db, clean_redis))
    assert KEY not in cleared["failing"]
    assert await alerts_about(db, KEY) == [
        ("alert", f"Alert: {KEY}"),
        ("alert", f"Still failing: {KEY}"),
        ("alert_resolved", f"Resolved: {KEY}"),
    ]
    await check_alerts(job_ctx(db, clean_redis))
    assert len(await alerts_about(db, KEY)) == 3  # resolved once


async def test_few_runs_do_not_make_a_rate(db: asyncpg.Pool, clean_redis: Redis) -> None:
    await db.execute("DELETE FROM job_runs WHERE task_name = $1", TASK)
    await runs(db, "failed", 2)  # 100 %, but fewer than SALESDASH_ALERT_FAILED_JOB_MIN_RUNS (5)
    result = await check_alerts(job_ctx(db, clean_redis))
    assert KEY not in result["failing"]


async def test_a_misconfigured_channel_is_named_by_the_health_check_and_at_start(
    db: asyncpg.Pool, clean_redis: Redis, spawn_worker: Any
) -> None:
    port = free_port()  # nothing listens: an unreachable SMTP server
    bad = {"smtp_host": HOST, "smtp_port": port, "webhook_urls": SecretStr("ftp://files.example.com/x")}
    checks = {c["check"]: c for c in (await check_system_health(job_ctx(db, clean_redis, **bad)))["checks"]}
    assert not checks["notify_email"]["ok"] and f"{HOST}:{port}" in checks["notify_email"]["detail"]
    assert not checks["notify_config"]["ok"] and "SALESDASH_WEBHOOK_URLS entry 1" in checks["notify_config"]["detail"]
    plain = {c["check"] for c in (await check_system_health(job_ctx(db, clean_redis)))["checks"]}
    assert not {c for c in plain if c.startswith("notify_")}  # nothing configured, nothing to check

    env = {"SALESDASH_SMTP_HOST": HOST, "SALESDASH_SMTP_PORT": str(port), "SALESDASH_WEBHOOK_URLS": "ftp://x/y"}
    worker = spawn_worker("worker.notifications.Settings", extra_env=env)

    async def named() -> bool:
        log = worker.log_path.read_text()
        return "notification channel email" in log and "notification channel config" in log

    await wait_for(named, timeout=60)
    assert worker.poll() is None  # named, and still running for the other channels
