"""Monitoring alerts: the failed-job rate per task from `job_runs`, and `alert_state`, each alert's firing state
(for its cooldown and its resolved message). Callers hold `lock_alerts` for the whole transaction, so two runs at
once take turns and the second sees what the first recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class TaskFailures:
    task: str
    finished: int  # complete or failed within the window
    failed: int


@dataclass(frozen=True)
class AlertState:
    key: str
    firing: bool
    since: datetime
    last_notified_at: datetime
    detail: str


_FAILURES = """
SELECT t.task, count(j.job_id) AS finished, count(j.job_id) FILTER (WHERE j.status = 'failed') AS failed
  FROM unnest($1::text[]) AS t (task)
  LEFT JOIN job_runs j ON j.task_name = t.task AND j.status IN ('complete', 'failed')
                      AND j.finished_at >= now() - make_interval(secs => $2)
 GROUP BY t.task
 ORDER BY t.task"""


async def task_failures(conn: asyncpg.Connection, tasks: Sequence[str], window_s: float) -> list[TaskFailures]:
    return [TaskFailures(**dict(r)) for r in await conn.fetch(_FAILURES, list(tasks), window_s)]


async def lock_alerts(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('salesdash:alerts'))")


async def alert_states(conn: asyncpg.Connection, keys: Sequence[str]) -> dict[str, AlertState]:
    rows = await conn.fetch(
        "SELECT alert_key AS key, firing, since, last_notified_at, detail FROM alert_state WHERE alert_key = ANY($1)",
        list(keys),
    )
    return {r["key"]: AlertState(**dict(r)) for r in rows}


async def save_alert_state(conn: asyncpg.Connection, key: str, firing: bool, since: datetime, detail: str) -> None:
    """The alert's state after a notification about it (now is when it was last notified)."""
    await conn.execute(
        """INSERT INTO alert_state (alert_key, firing, since, last_notified_at, detail) VALUES ($1, $2, $3, now(), $4)
           ON CONFLICT (alert_key) DO UPDATE
              SET firing = $2, since = $3, last_notified_at = now(), detail = $4""",
        key,
        firing,
        since,
        detail,
    )


async def transaction_now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT now()")
    return now
