"""`check_alerts` (every 5 minutes): the failed-job rate per task, the oldest waiting job per queue, rollups older than
their freshness target, queues with no live worker. Each failing check alerts once, again after the cooldown while it
keeps failing, and says when it clears (worker/alerting.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from db.queries import health as health_queries
from db.queries.alerts import TaskFailures, task_failures
from salesdash.config import Settings
from worker.alerting import raise_alerts
from worker.delivery import deliver_due
from worker.health import HealthCheck
from worker.jobs.health import queue_checks, rollup_check, rollup_max_age
from worker.jobstore import now_ms
from worker.registry import TASKS


def failure_check(failures: TaskFailures, settings: Settings) -> HealthCheck:
    rate = failures.failed / failures.finished if failures.finished else 0.0
    enough = failures.finished >= settings.alert_failed_job_min_runs
    window = f"{settings.alert_window_s:g} s"
    return HealthCheck(
        check=f"job_failures_{failures.task}",
        ok=not enough or rate <= settings.alert_failed_job_rate,
        detail=f"{failures.failed} of {failures.finished} runs failed in the last {window} ({rate:.0%}; at most "
        f"{settings.alert_failed_job_rate:.0%} once {settings.alert_failed_job_min_runs} runs have finished)",
        values={"finished": failures.finished, "failed": failures.failed, "rate": round(rate, 4)},
    )


async def _database_checks(conn: asyncpg.Connection, settings: Settings) -> list[HealthCheck]:
    failures = await task_failures(conn, sorted(TASKS), settings.alert_window_s)
    rollups = await health_queries.rollup_freshness(conn)
    now = datetime.fromtimestamp(now_ms() / 1000, UTC)
    return [failure_check(f, settings) for f in failures] + [
        rollup_check(r, rollup_max_age(settings, r.family), now) for r in rollups
    ]


async def check_alerts(ctx: dict[str, Any]) -> dict[str, Any]:
    settings: Settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    async with ctx["db"].acquire() as conn:
        checks = await _database_checks(conn, settings)
        checks += await queue_checks(redis, settings)
        recorded = await raise_alerts(conn, settings, checks)
    delivery = await deliver_due(ctx["db"], settings, recorded) if recorded else None
    return {
        "failing": [c.check for c in checks if not c.ok],
        "checked": len(checks),
        "notifications": recorded,
        "delivery": delivery,
    }
