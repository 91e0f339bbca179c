"""What `check_system_health` asks PostgreSQL: connections and long queries, the order partitions ahead, how fresh
the analytics rollups are. Read-only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Connections count server-wide (max_connections is the server's); long queries only in this database, whose
# queries are ours. The checking connection itself is not counted as long.
_SERVER = """
SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS connections,
       current_setting('max_connections')::int AS max_connections,
       count(*) FILTER (WHERE now() - query_start > make_interval(secs => $1)) AS long_queries,
       coalesce(extract(epoch FROM max(now() - query_start)), 0)::float8 AS longest_query_s
  FROM pg_stat_activity
 WHERE datname = current_database() AND state = 'active' AND backend_type = 'client backend'
   AND pid <> pg_backend_pid()"""

# Consecutive UTC months, from the current one on, that both orders and order_items have a partition for (the
# partitions are UTC months: ensure_order_partitions). Bounds come from the catalog, so a partition of any span
# counts for every month it covers.
_MONTHS_COVERED = r"""
WITH bounds AS (
    SELECT i.inhparent AS parent,
           regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS b
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent IN ('orders'::regclass, 'order_items'::regclass)),
months AS (
    SELECT k, date_trunc('month', now(), 'UTC') + make_interval(months => k) AS start
      FROM generate_series(0, $1) AS k),
covered AS (
    SELECT m.k,
           (SELECT count(DISTINCT parent) FROM bounds
             WHERE b[1]::timestamptz <= m.start AND b[2]::timestamptz >= m.start + interval '1 month') = 2 AS ok
      FROM months m)
SELECT coalesce(min(k) FILTER (WHERE NOT ok), $1 + 1)::int FROM covered"""

# Per rollup family: whether changes wait in its log, and when it was last brought up to date (the newest of a
# finished refresh job of the family or of a full rebuild, and the family's last rebuild).
_ROLLUPS = """
SELECT f.family,
       EXISTS (SELECT 1 FROM rollup_invalidations i WHERE i.family = f.family) AS pending,
       greatest(s.rebuilt_at,
                (SELECT max(j.finished_at) FROM job_runs j
                  WHERE j.status = 'complete' AND j.task_name IN (f.task, 'refresh_all_materialized_views')))
           AS refreshed_at
  FROM (VALUES ('realtime', 'refresh_realtime_materialized_views'),
               ('daily', 'refresh_daily_materialized_views')) AS f (family, task)
  LEFT JOIN rollup_state s ON s.family = f.family
 ORDER BY f.family DESC"""


@dataclass(frozen=True)
class ServerStatus:
    connections: int
    max_connections: int
    long_queries: int  # active longer than the threshold, in this database
    longest_query_s: float


@dataclass(frozen=True)
class RollupFreshness:
    family: str
    pending: bool  # changes wait in the family's invalidation log
    refreshed_at: datetime | None  # None: never, as far as the job history and the family's state tell


async def server_status(conn: asyncpg.Connection, long_query_s: float) -> ServerStatus:
    row = await conn.fetchrow(_SERVER, long_query_s)
    return ServerStatus(row["connections"], row["max_connections"], row["long_queries"], row["longest_query_s"])


async def months_covered(conn: asyncpg.Connection, horizon: int) -> int:
    """How many consecutive UTC months, from the current one on, have their partitions (at most `horizon` + 1)."""
    return int(await conn.fetchval(_MONTHS_COVERED, horizon))


async def rollup_freshness(conn: asyncpg.Connection) -> list[RollupFreshness]:
    return [RollupFreshness(r["family"], r["pending"], r["refreshed_at"]) for r in await conn.fetch(_ROLLUPS)]
