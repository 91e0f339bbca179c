"""The system health report: its typed records, where the last one is kept in Redis, and its Prometheus gauges.

- `salesdash:health:v1:last`  JSON of the last `HealthReport` that `check_system_health` made, kept
  REPORT_TTL_S: a report that stops being renewed goes away, and so do its gauges.

`/metrics` renders it as
- `salesdash_health_check{check="..."}` 1 (passing) or 0 (failing);
- `salesdash_health_value{check="...",measure="..."}` the values each check measured;
- `salesdash_health_checked_timestamp_seconds` when the report was made.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

LAST_REPORT_KEY = "salesdash:health:v1:last"
REPORT_TTL_S = 3600  # six runs of the 10-minute schedule


class HealthCheck(BaseModel):
    check: str  # e.g. "postgres_connections", "queue_workers_analytics"
    ok: bool
    detail: str  # what was found, in words
    values: dict[str, float] = {}  # what was measured, by name


class HealthReport(BaseModel):
    """The job result of `check_system_health`, and what `/metrics` shows."""

    checked_at: datetime
    ok: bool  # every check passed
    failing: list[str]  # names of the failing checks
    checks: list[HealthCheck]
    notifications_recorded: int = 0  # new alerts in the notifications outbox (worker/alerting.py)
    notification_error: str | None = None  # why failing checks could not be recorded (PostgreSQL unreachable)


async def store_report(redis: Redis, report: HealthReport) -> None:
    await redis.set(LAST_REPORT_KEY, report.model_dump_json(), ex=REPORT_TTL_S)


async def last_report(redis: Redis) -> HealthReport | None:
    """The last stored report; None when there is none, or it cannot be read (an older layout: it expires)."""
    raw = await redis.get(LAST_REPORT_KEY)
    if raw is None:
        return None
    try:
        return HealthReport.model_validate_json(raw)
    except ValidationError:
        return None


def families(report: HealthReport | None) -> Iterator[Metric]:
    """Prometheus gauges of a report (none without one)."""
    if report is None:
        return
    status = GaugeMetricFamily("salesdash_health_check", "1 when the health check passed, 0 when not", labels=["check"])
    values = GaugeMetricFamily("salesdash_health_value", "What a health check measured", labels=["check", "measure"])
    for check in report.checks:
        status.add_metric([check.check], 1.0 if check.ok else 0.0)
        for measure, value in sorted(check.values.items()):
            values.add_metric([check.check, measure], value)
    yield status
    yield values
    checked = GaugeMetricFamily("salesdash_health_checked_timestamp_seconds", "When the last health report was made")
    checked.add_metric([], report.checked_at.timestamp())
    yield checked
