"""`check_system_health`: PostgreSQL (reachable, connections in use, long queries, order partitions ahead, rollup
freshness), Redis (reachable, memory) and the queues (oldest waiting job, live workers), each a passing or failing
check with what it measured. The report is the job result and, kept in Redis (worker/health.py), the gauges of
`/metrics`; each failing check becomes an alert in the notifications outbox (worker/alerting.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from db.queries import health as queries
from db.queries.health import RollupFreshness, ServerStatus
from salesdash.config import Settings
from worker import client, jobstore
from worker import health as reports
from worker.alerting import raise_alerts
from worker.channels import channel_problems
from worker.health import HealthCheck, HealthReport
from worker.jobs.partitions import PREMAKE_MONTHS
from worker.registry import Queue

CHECK_TIMEOUT_S = 5.0  # a server that takes longer to answer fails its checks
PARTITION_MONTHS_AHEAD = PREMAKE_MONTHS  # what create_order_partitions keeps ready after the current month
POSTGRES_CHECKS = ("postgres_connections", "postgres_long_queries", "order_partitions_ahead")
ROLLUP_FAMILIES = ("realtime", "daily")
_POSTGRES_FAULTS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_REDIS_FAULTS = (OSError, TimeoutError, RedisError)


async def check_system_health(ctx: dict[str, Any]) -> dict[str, Any]:
    settings: Settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    checks = await _postgres_checks(ctx["db"], settings)
    checks += await _redis_checks(redis, settings)
    checks += await queue_checks(redis, settings)
    checks += await channel_checks(settings)
    failing = [c.check for c in checks if not c.ok]
    report = HealthReport(checked_at=datetime.now(UTC), ok=not failing, failing=failing, checks=checks)
    report = await _notify(ctx["db"], settings, report)
    await reports.store_report(redis, report)
    return report.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


async def _postgres_checks(pool: asyncpg.Pool, settings: Settings) -> list[HealthCheck]:
    names = ("postgres_reachable", *POSTGRES_CHECKS, *(f"rollups_{f}_fresh" for f in ROLLUP_FAMILIES))
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), pool.acquire() as conn:
            status = await queries.server_status(conn, settings.health_long_query_s)
            covered = await queries.months_covered(conn, PARTITION_MONTHS_AHEAD)
            rollups = await queries.rollup_freshness(conn)
    except _POSTGRES_FAULTS as exc:
        detail = f"PostgreSQL did not answer: {type(exc).__name__}: {exc}"
        return [HealthCheck(check=name, ok=False, detail=detail) for name in names]
    now = datetime.now(UTC)
    return [
        HealthCheck(check="postgres_reachable", ok=True, detail="answered"),
        connections_check(status, settings.health_connections_max_ratio),
        long_queries_check(status, settings.health_long_query_s),
        partitions_check(covered),
        *(rollup_check(r, rollup_max_age(settings, r.family), now) for r in rollups),
    ]


def connections_check(status: ServerStatus, max_ratio: float) -> HealthCheck:
    ratio = status.connections / status.max_connections
    return HealthCheck(
        check="postgres_connections",
        ok=ratio <= max_ratio,
        detail=f"{status.connections} of {status.max_connections} connections in use ({ratio:.0%}; "
        f"at most {max_ratio:.0%})",
        values={"in_use": status.connections, "max": status.max_connections, "ratio": round(ratio, 4)},
    )


def long_queries_check(status: ServerStatus, threshold_s: float) -> HealthCheck:
    return HealthCheck(
        check="postgres_long_queries",
        ok=status.long_queries == 0,
        detail=f"{status.long_queries} queries running longer than {threshold_s:g} s "
        f"(the longest: {status.longest_query_s:.0f} s)",
        values={
            "count": status.long_queries,
            "longest_seconds": round(status.longest_query_s, 3),
            "threshold_seconds": threshold_s,
        },
    )


def partitions_check(months_covered: int) -> HealthCheck:
    ahead = months_covered - 1  # the current month is the first covered one
    detail = (
        "the current month has no partition: orders cannot be written"
        if ahead < 0
        else f"partitions for {ahead} months after the current one (needed: {PARTITION_MONTHS_AHEAD})"
    )
    return HealthCheck(
        check="order_partitions_ahead",
        ok=ahead >= PARTITION_MONTHS_AHEAD,
        detail=detail,
        values={"months_ahead": ahead, "required": PARTITION_MONTHS_AHEAD},
    )


def rollup_check(rollup: RollupFreshness, max_age_s: float, now: datetime) -> HealthCheck:
    """Stale: changes wait in the family's log and it was last brought up to date longer ago than its target."""
    name = f"rollups_{rollup.family}_fresh"
    values = {"pending": 1.0 if rollup.pending else 0.0, "max_age_seconds": max_age_s}
    if not rollup.pending:
        return HealthCheck(check=name, ok=True, detail="no change waits to be rolled up", values=values)
    if rollup.refreshed_at is None:
        return HealthCheck(check=name, ok=False, detail="changes wait and no refresh has ever run", values=values)
    age = (now - rollup.refreshed_at).total_seconds()
    values["staleness_seconds"] = round(age, 3)
    return HealthCheck(
        check=name,
        ok=age <= max_age_s,
        detail=f"changes wait; last refreshed {age:.0f} s ago (target: {max_age_s:g} s)",
        values=values,
    )


def rollup_max_age(settings: Settings, family: str) -> float:
    if family == "realtime":
        return settings.health_realtime_rollup_max_age_s
    return settings.health_daily_rollup_max_age_s


# --------------------------------------------------------------------------------------------------
# Redis and the queues
# --------------------------------------------------------------------------------------------------


async def _redis_checks(redis: Redis, settings: Settings) -> list[HealthCheck]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await redis.ping()
            memory = await redis.info("memory")
    except _REDIS_FAULTS as exc:
        detail = f"Redis did not answer: {type(exc).__name__}: {exc}"
        return [HealthCheck(check=name, ok=False, detail=detail) for name in ("redis_reachable", "redis_memory")]
    return [HealthCheck(check="redis_reachable", ok=True, detail="answered"), memory_check(memory, settings)]


def memory_check(memory: dict[str, Any], settings: Settings) -> HealthCheck:
    """Used memory against maxmemory, or against the machine's memory when Redis has no limit."""
    used = int(memory["used_memory"])
    limit = int(memory.get("maxmemory") or 0) or int(memory.get("total_system_memory") or 0)
    ratio = used / limit if limit else 0.0
    bound = "maxmemory" if memory.get("maxmemory") else "the machine's memory"
    return HealthCheck(
        check="redis_memory",
        ok=ratio <= settings.health_redis_memory_max_ratio,
        detail=f"{used} bytes used, {ratio:.1%} of {bound} (at most {settings.health_redis_memory_max_ratio:.0%})",
        values={"used_bytes": used, "limit_bytes": limit, "ratio": round(ratio, 4)},
    )


async def queue_checks(redis: Redis, settings: Settings) -> list[HealthCheck]:
    queues = [q.value for q in Queue]
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            overview = await client.queue_overview(redis)
            oldest = [await jobstore.oldest_waiting_ms(redis, q) for q in queues]
    except _REDIS_FAULTS as exc:
        detail = f"Redis did not answer: {type(exc).__name__}: {exc}"
        names = [f"queue_{kind}_{q}" for q in queues for kind in ("wait", "workers")]
        return [HealthCheck(check=name, ok=False, detail=detail) for name in names]
    now = jobstore.now_ms()
    checks = []
    for queue, since in zip(queues, oldest, strict=True):
        checks.append(wait_check(queue, None if since is None else max(now - since, 0) / 1000, settings))
        checks.append(workers_check(queue, overview[queue]["workers"]))
    return checks


def wait_check(queue: str, waited_s: float | None, settings: Settings) -> HealthCheck:
    limit = settings.health_queue_wait_max_s
    detail = "no job waits" if waited_s is None else f"the oldest waiting job is due since {waited_s:.0f} s"
    return HealthCheck(
        check=f"queue_wait_{queue}",
        ok=waited_s is None or waited_s <= limit,
        detail=f"{detail} (at most {limit:g} s)",
        values={"oldest_wait_seconds": round(waited_s or 0.0, 3), "max_seconds": limit},
    )


def workers_check(queue: str, workers: int) -> HealthCheck:
    return HealthCheck(
        check=f"queue_workers_{queue}",
        ok=workers > 0,
        detail=f"{workers} live workers" if workers else "no live worker: its jobs wait and its schedule stops",
        values={"workers": workers},
    )


# --------------------------------------------------------------------------------------------------
# Notifications
# --------------------------------------------------------------------------------------------------


async def _notify(pool: asyncpg.Pool, settings: Settings, report: HealthReport) -> HealthReport:
    """Failing checks become alerts through the notifications outbox (worker/alerting.py: once, then once per
    cooldown, and a resolved message when they pass again); the notifications queue delivers them."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), pool.acquire() as conn:
            recorded = await raise_alerts(conn, settings, report.checks)
    except _POSTGRES_FAULTS as exc:
        return report.model_copy(update={"notification_error": f"{type(exc).__name__}: {exc}"})
    return report.model_copy(update={"notifications_recorded": len(recorded)})


async def channel_checks(settings: Settings) -> list[HealthCheck]:
    """Each configured notification channel answers (SMTP: connects and logs in; webhook: its host accepts a
    connection), and no channel setting is malformed. Nothing configured: no check."""
    found = await channel_problems(settings)
    if found["config"] is None:
        del found["config"]
    return [
        HealthCheck(check=f"notify_{name}", ok=problem is None, detail=problem or "answers")
        for name, problem in found.items()
    ]
