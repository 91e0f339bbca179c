"""Analytics rollups, maintained incrementally: the four `mv_*` tables (migration 0002) are recomputed only where
orders, order items or product categories changed.

Change capture is in PostgreSQL: statement triggers write the 15-minute UTC buckets of changed rows to
`rollup_invalidations`, once per family. A refresh of a family, in one READ COMMITTED transaction under the family's
advisory lock (a second run skips):

1. `DELETE ... RETURNING` the family's log rows. It removes committed rows only, so a change committed later, or
   still in flight, keeps its row for the next run; later statements see at least what the DELETE saw.
2. Maps the buckets to UTC hours (realtime) or to local days in the configured timezone (daily; a 15-minute bucket
   never straddles a local day, every real offset being a multiple of 15 minutes).
3. Recomputes exactly those hours or days from orders/order_items (one index range scan per hour or day, partitions
   pruned at run time), upserts the rows that changed and deletes the ones that no longer have data.

The daily family also keeps each customer's first order (`rollup_customer_first_orders`, for new vs returning
customers). A change can move a customer's first order to another day, so the days of the old and the new first
order are recomputed too.

A rebuild computes the same measures (the same SQL fragments) over all rows, deletes every row of the family's tables
and inserts the result; readers see the old rows until it commits. A refresh rebuilds instead when the family was
never built (after the migration or a TRUNCATE of the sales tables), was built in another timezone, or when more than
`REBUILD_SHARE` of its hours or days changed (recomputing them one by one would cost more).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal

import asyncpg


class Family(StrEnum):
    REALTIME = "realtime"  # mv_hourly_sales_metrics, UTC hours
    DAILY = "daily"  # the three daily tables, local days


REALTIME_VIEWS = ("mv_hourly_sales_metrics",)
DAILY_VIEWS = ("mv_daily_sales_summary", "mv_daily_product_sales", "mv_daily_category_sales")
ALL_VIEWS = REALTIME_VIEWS + DAILY_VIEWS
FIRST_ORDERS = "rollup_customer_first_orders"

Mode = Literal["incremental", "rebuild", "skipped"]
ProgressFn = Callable[[float, str], Awaitable[None]]


@dataclass(frozen=True)
class ViewRefresh:
    """What one refresh did to one rollup table."""

    view: str
    rows: int  # rows computed for the recomputed hours/days; after a rebuild, every row of the table
    upserted: int  # rows inserted or changed
    deleted: int  # rows of recomputed hours/days that no longer have any data


@dataclass(frozen=True)
class RefreshOutcome:
    """What one refresh run did: the job result of the view tasks."""

    family: str  # "realtime", "daily", or "all" for a rebuild of both
    mode: Mode
    skipped: bool  # another run of the family held its lock
    reason: str  # why it rebuilt or skipped; empty for an incremental run
    buckets: int  # distinct 15-minute buckets taken from the invalidation log
    hours: int  # UTC hours recomputed
    days: int  # local days recomputed
    views: list[ViewRefresh] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class RefreshLimits:
    lock_timeout_s: float | None = 5.0  # waits for table or advisory locks; None: the server's setting
    statement_timeout_s: float | None = None  # None: the server's setting


# --------------------------------------------------------------------------------------------------
# Measures: one definition each, used by the rebuild and by the incremental refresh
# --------------------------------------------------------------------------------------------------

_REVENUE = "('paid', 'shipped', 'delivered')"
_ORDER_MEASURES = f"""count(*) AS orders_count,
       count(*) FILTER (WHERE o.status IN {_REVENUE}) AS paid_orders,
       coalesce(sum(o.total_amount) FILTER (WHERE o.status IN {_REVENUE}), 0)::numeric(16, 2) AS revenue,
       count(DISTINCT o.customer_id) AS unique_customers,
       count(*) FILTER (WHERE o.status = 'cancelled') AS cancelled_orders,
       count(*) FILTER (WHERE o.status = 'refunded') AS refunded_orders,
       coalesce(sum(o.total_amount) FILTER (WHERE o.status = 'refunded'), 0)::numeric(16, 2) AS refunded_amount"""
# A customer is new on the local day of their first-ever order (any status). That order is an order of the day, so
# the day's new customers are the customers whose first order falls on it.
_NEW_CUSTOMERS = "count(*) AS new_customers"
_UNITS = "coalesce(sum(i.quantity), 0)::bigint AS units"
_ITEM_MEASURES = """sum(i.quantity)::bigint AS units,
       sum(i.quantity * i.unit_price)::numeric(16, 2) AS revenue,
       count(DISTINCT i.order_id) AS orders_count"""
# Items of revenue orders (an item belongs to the order with its id and created_at). The incremental statements
# reach the items of an hour or day through its orders (order_items has no index on created_at); the rebuilds scan
# the items and ask for their order (a join on both columns makes the planner expect a handful of rows out of
# millions, and it then sorts and loops accordingly).
_PAID_ITEMS = "order_items i JOIN orders o ON o.id = i.order_id AND o.created_at = i.created_at"
_PAID = f"o.status IN {_REVENUE}"
_ALL_PAID_ITEMS = (
    "order_items i {join} WHERE EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id AND o.created_at = i.created_at"
    f" AND {_PAID})"
)

_HOURLY_VALUES = """m.orders_count, m.paid_orders, m.revenue, coalesce(u.units, 0) AS units,
       round(m.revenue / nullif(m.paid_orders, 0), 2) AS avg_order_value, m.unique_customers,
       m.cancelled_orders, m.refunded_orders, m.refunded_amount"""
_DAILY_VALUES = """m.orders_count, m.paid_orders, m.revenue, coalesce(u.units, 0) AS units,
       round(m.revenue / nullif(m.paid_orders, 0), 2) AS avg_order_value, m.unique_customers,
       coalesce(n.new_customers, 0) AS new_customers,
       m.unique_customers - coalesce(n.new_customers, 0) AS returning_customers,
       m.cancelled_orders, m.refunded_orders, m.refunded_amount"""


_HOURLY_COLUMNS = (
    "orders_count", "paid_orders", "revenue", "units", "avg_order_value", "unique_customers", "cancelled_orders",
    "refunded_orders", "refunded_amount",
)  # fmt: skip
_DAILY_COLUMNS = (
    "orders_count", "paid_orders", "revenue", "units", "avg_order_value", "unique_customers", "new_customers",
    "returning_customers", "cancelled_orders", "refunded_orders", "refunded_amount",
)  # fmt: skip


def _in_hour(column: str) -> str:
    return f"{column} >= h.hour AT TIME ZONE 'UTC' AND {column} < (h.hour + interval '1 hour') AT TIME ZONE 'UTC'"


def _in_day(column: str) -> str:
    # The range (with 2 h of slack for a zone whose local day is not one contiguous range, as when clocks go back
    # across midnight) lets the index and run-time partition pruning work; the date test is the rebuild's own.
    return (
        f"{column} >= (d.day::timestamp AT TIME ZONE $1) - interval '2 hours' "
        f"AND {column} < ((d.day + 1)::timestamp AT TIME ZONE $1) + interval '2 hours' "
        f"AND {_local_day(column)} = d.day"
    )


def _local_day(column: str) -> str:
    return f"({column} AT TIME ZONE $1)::date"


@dataclass(frozen=True)
class _Rollup:
    """A rollup table, and the two sources of its rows: every row ($1 = timezone where needed), or the rows of the
    hours/days being recomputed (`partial`, with `scope` naming those keys in the table)."""

    table: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    full: str
    partial: str
    scope: str

    @property
    def partial_sql(self) -> str:
        """Upsert the recomputed rows that differ, delete the rows in scope that no longer have data."""
        columns = ", ".join(self.keys + self.values)
        changed = " OR ".join(f"t.{v} IS DISTINCT FROM EXCLUDED.{v}" for v in self.values)
        matches = " AND ".join(f"f.{k} = t.{k}" for k in self.keys)
        return f"""
WITH fresh AS MATERIALIZED ({self.partial}),
upserted AS (
    INSERT INTO {self.table} AS t ({columns}) SELECT {columns} FROM fresh
    ON CONFLICT ({", ".join(self.keys)}) DO UPDATE SET {", ".join(f"{v} = EXCLUDED.{v}" for v in self.values)}
    WHERE {changed}
    RETURNING 1),
deleted AS (
    DELETE FROM {self.table} t WHERE {self.scope} AND NOT EXISTS (SELECT 1 FROM fresh f WHERE {matches})
    RETURNING 1)
SELECT (SELECT count(*) FROM fresh) AS rows, (SELECT count(*) FROM upserted) AS upserted,
       (SELECT count(*) FROM deleted) AS deleted"""

    @property
    def insert_all_sql(self) -> str:
        # a rebuild deletes every row first (readers keep seeing the old rows until commit): writing the whole
        # table costs less than comparing it row by row
        return f"INSERT INTO {self.table} ({', '.join(self.keys + self.values)}) {self.full}"


_HOURLY = _Rollup(
    "mv_hourly_sales_metrics",
    ("hour",),
    _HOURLY_COLUMNS,
    full=f"""
SELECT m.hour, {_HOURLY_VALUES}
  FROM (SELECT date_trunc('hour', o.created_at AT TIME ZONE 'UTC') AS hour, {_ORDER_MEASURES}
          FROM orders o GROUP BY 1) m
  LEFT JOIN (SELECT date_trunc('hour', i.created_at AT TIME ZONE 'UTC') AS hour, {_UNITS}
               FROM {_ALL_PAID_ITEMS.format(join="")} GROUP BY 1) u ON u.hour = m.hour""",
    # $1: the UTC hours to recompute
    partial=f"""
SELECT h.hour, {_HOURLY_VALUES}
  FROM unnest($1::timestamp[]) AS h (hour)
 CROSS JOIN LATERAL (SELECT {_ORDER_MEASURES} FROM orders o WHERE {_in_hour("o.created_at")}) m
 CROSS JOIN LATERAL (SELECT {_UNITS} FROM {_PAID_ITEMS}
                      WHERE {_PAID} AND {_in_hour("i.created_at")} AND {_in_hour("o.created_at")}) u
 WHERE m.orders_count > 0""",
    scope="t.hour = ANY ($1::timestamp[])",
)

_DAILY_SUMMARY = _Rollup(
    "mv_daily_sales_summary",
    ("day",),
    _DAILY_COLUMNS,
    full=f"""
SELECT m.day, {_DAILY_VALUES}
  FROM (SELECT {_local_day("o.created_at")} AS day, {_ORDER_MEASURES} FROM orders o GROUP BY 1) m
  LEFT JOIN (SELECT {_local_day("i.created_at")} AS day, {_UNITS}
               FROM {_ALL_PAID_ITEMS.format(join="")} GROUP BY 1) u ON u.day = m.day
  LEFT JOIN (SELECT {_local_day("f.first_order_at")} AS day, {_NEW_CUSTOMERS}
               FROM {FIRST_ORDERS} f GROUP BY 1) n ON n.day = m.day""",
    # $1: timezone, $2: the local days to recompute
    partial=f"""
SELECT d.day, {_DAILY_VALUES}
  FROM unnest($2::date[]) AS d (day)
 CROSS JOIN LATERAL (SELECT {_ORDER_MEASURES} FROM orders o WHERE {_in_day("o.created_at")}) m
 CROSS JOIN LATERAL (SELECT {_UNITS} FROM {_PAID_ITEMS}
                      WHERE {_PAID} AND {_in_day("i.created_at")} AND {_in_day("o.created_at")}) u
 CROSS JOIN LATERAL (SELECT {_NEW_CUSTOMERS} FROM {FIRST_ORDERS} f WHERE {_in_day("f.first_order_at")}) n
 WHERE m.orders_count > 0""",
    scope="t.day = ANY ($2::date[])",
)


def _daily_items_rollup(table: str, key: str, key_expr: str, join: str) -> _Rollup:
    """Daily sales per product or per category: items of revenue orders, grouped by `key_expr`."""
    return _Rollup(
        table,
        ("day", key),
        ("units", "revenue", "orders_count"),
        full=f"""
SELECT {_local_day("i.created_at")} AS day, {key_expr} AS {key}, {_ITEM_MEASURES}
  FROM {_ALL_PAID_ITEMS.format(join=join)} GROUP BY 1, 2""",
        partial=f"""
SELECT d.day, m.{key}, m.units, m.revenue, m.orders_count
  FROM unnest($2::date[]) AS d (day)
 CROSS JOIN LATERAL (SELECT {key_expr} AS {key}, {_ITEM_MEASURES}
                       FROM {_PAID_ITEMS} {join}
                      WHERE {_PAID} AND {_in_day("i.created_at")} AND {_in_day("o.created_at")}
                      GROUP BY 1) m""",
        scope="t.day = ANY ($2::date[])",
    )


_DAILY_PRODUCTS = _daily_items_rollup("mv_daily_product_sales", "product_id", "i.product_id", "")
_DAILY_CATEGORIES = _daily_items_rollup(
    "mv_daily_category_sales", "category", "p.category", "JOIN products p ON p.id = i.product_id"
)

_FIRST_ORDERS = _Rollup(
    FIRST_ORDERS,
    ("customer_id",),
    ("first_order_at",),
    full="SELECT o.customer_id, min(o.created_at) AS first_order_at FROM orders o GROUP BY 1",
    partial="",  # incremental: _FIRST_ORDERS_PARTIAL, which also says which days moved
    scope="",
)

# $1: timezone, $2: the changed 15-minute buckets, $3: their local days. Returns the days to recompute: those,
# plus the days of every first order that moved. A customer's first order can change only if it lies in a changed
# bucket (it may have moved or gone: look it up again) or if the customer has an order in one now (it may be
# earlier than the recorded one: take the earlier of the two).
_FIRST_ORDERS_PARTIAL = f"""
WITH buckets AS (SELECT b AS lo FROM unnest($2::timestamptz[]) AS b),
touched AS (
    SELECT o.customer_id, min(o.created_at) AS earliest
      FROM buckets
     CROSS JOIN LATERAL (SELECT o.customer_id, o.created_at FROM orders o
                          WHERE o.created_at >= buckets.lo AND o.created_at < buckets.lo + interval '15 minutes'
                         OFFSET 0) o
     GROUP BY o.customer_id),
lost AS (
    SELECT s.customer_id
      FROM buckets
     CROSS JOIN LATERAL (SELECT s.customer_id FROM {FIRST_ORDERS} s
                          WHERE s.first_order_at >= buckets.lo
                            AND s.first_order_at < buckets.lo + interval '15 minutes'
                         OFFSET 0) s),
candidates AS (
    SELECT u.customer_id, u.old_first,
           -- orders earlier than the recorded first order can only be in changed buckets (touched), and no order
           -- outside them is earlier than it: for a lost one, look up the customer's orders from it on
           CASE WHEN u.customer_id IN (SELECT customer_id FROM lost)
                THEN least(t.earliest, (SELECT min(x.created_at) FROM orders x
                                         WHERE x.customer_id = u.customer_id AND x.created_at >= u.old_first))
                ELSE least(u.old_first, t.earliest) END AS new_first
      FROM (SELECT c.customer_id,
                   (SELECT s.first_order_at FROM {FIRST_ORDERS} s WHERE s.customer_id = c.customer_id) AS old_first
              FROM (SELECT customer_id FROM touched UNION SELECT customer_id FROM lost) c) u
      LEFT JOIN touched t ON t.customer_id = u.customer_id),
changed AS (SELECT * FROM candidates WHERE old_first IS DISTINCT FROM new_first),
upserted AS (
    INSERT INTO {FIRST_ORDERS} (customer_id, first_order_at)
    SELECT customer_id, new_first FROM changed WHERE new_first IS NOT NULL
    ON CONFLICT (customer_id) DO UPDATE SET first_order_at = EXCLUDED.first_order_at
    RETURNING 1),
deleted AS (
    DELETE FROM {FIRST_ORDERS} t USING changed c WHERE t.customer_id = c.customer_id AND c.new_first IS NULL
    RETURNING 1)
SELECT (SELECT count(*) FROM candidates) AS rows, (SELECT count(*) FROM upserted) AS upserted,
       (SELECT count(*) FROM deleted) AS deleted,
       ARRAY(SELECT unnest($3::date[])
             UNION SELECT (old_first AT TIME ZONE $1)::date FROM changed WHERE old_first IS NOT NULL
             UNION SELECT (new_first AT TIME ZONE $1)::date FROM changed WHERE new_first IS NOT NULL
             ORDER BY 1) AS days"""

# $1: family, $2: the timezone of its days
_CONSUME = """
WITH consumed AS (DELETE FROM rollup_invalidations WHERE family = $1 RETURNING bucket)
SELECT coalesce(array_agg(DISTINCT bucket ORDER BY bucket), '{}') AS buckets,
       coalesce(array_agg(DISTINCT date_trunc('hour', bucket AT TIME ZONE 'UTC')), '{}') AS hours,
       coalesce(array_agg(DISTINCT (bucket AT TIME ZONE $2)::date), '{}') AS days
  FROM consumed"""
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('salesdash:rollups:' || $1))"
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('salesdash:rollups:' || $1))"
_BUILT_TIMEZONE = "SELECT timezone FROM rollup_state WHERE family = $1"
_MARK_BUILT = "UPDATE rollup_state SET timezone = $2, rebuilt_at = now() WHERE family = $1"

_WORK_MEM = "128MB"
# An incremental refresh reaches each hour or day through an index, a rebuild scans everything once: past this share
# of the table's hours or days (late changes spread over the history), rebuilding the family costs less.
REBUILD_SHARE = 0.25
_KEYS_IN = {
    Family.REALTIME: "SELECT count(*) FROM mv_hourly_sales_metrics",
    Family.DAILY: "SELECT count(*) FROM mv_daily_sales_summary",
}

_ROLLUPS: dict[Family, tuple[_Rollup, ...]] = {
    Family.REALTIME: (_HOURLY,),
    Family.DAILY: (_FIRST_ORDERS, _DAILY_SUMMARY, _DAILY_PRODUCTS, _DAILY_CATEGORIES),
}


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


async def refresh_family(
    conn: asyncpg.Connection,
    family: Family,
    *,
    timezone: str,
    limits: RefreshLimits = RefreshLimits(),
    progress: ProgressFn | None = None,
) -> RefreshOutcome:
    """Bring one family up to date in one transaction: recompute the logged hours/days, or rebuild the family when
    it was never built or was built in another timezone. Returns `skipped` at once when another run holds the
    family's lock. `timezone` is the IANA name the daily family's days are read in."""
    started = time.perf_counter()
    async with conn.transaction():
        if not await conn.fetchval(_TRY_LOCK, family.value):
            return RefreshOutcome(family.value, "skipped", True, "another refresh of this family is running", 0, 0, 0)
        await _apply_limits(conn, limits)
        zone = _zone(family, timezone)
        built = await conn.fetchval(_BUILT_TIMEZONE, family.value)
        if built != zone:
            reason = "not built yet (new, or sales tables truncated)" if built is None else f"built in {built}"
            return await _rebuild(conn, (family,), timezone, f"{reason}; rebuilt in {zone}", started, progress)
        if family is Family.REALTIME:
            return await _refresh_realtime(conn, started, progress)
        return await _refresh_daily(conn, timezone, started, progress)


async def rebuild(
    conn: asyncpg.Connection,
    *families: Family,
    timezone: str,
    limits: RefreshLimits = RefreshLimits(),
    progress: ProgressFn | None = None,
    reason: str = "requested",
) -> RefreshOutcome:
    """Recompute the families' rollups (all of them when none is named) from orders and clear their log, in one
    transaction (a savepoint inside the caller's). Waits for running refreshes (bounded by the lock timeout) rather
    than skipping: this is the repair."""
    started = time.perf_counter()
    chosen = [family for family in Family if family in families or not families]
    async with conn.transaction():
        await _apply_limits(conn, limits)
        await lock_rollups(conn, *chosen)
        return await _rebuild(conn, chosen, timezone, reason, started, progress)


async def lock_rollups(conn: asyncpg.Connection, *families: Family) -> None:
    """Take the families' locks (all when none is named) for the rest of the transaction, always in the same order,
    so two callers never deadlock. A loader takes them before it truncates the sales tables: a refresh then never
    holds a lock the loader waits for while it waits for a table the loader holds."""
    for family in Family:
        if family in families or not families:
            await conn.execute(_LOCK, family.value)


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def _zone(family: Family, timezone: str) -> str:
    return "UTC" if family is Family.REALTIME else timezone


async def _apply_limits(conn: asyncpg.Connection, limits: RefreshLimits) -> None:
    for name, seconds in (("lock_timeout", limits.lock_timeout_s), ("statement_timeout", limits.statement_timeout_s)):
        if seconds is not None:
            await conn.execute("SELECT set_config($1, $2, true)", name, f"{max(int(seconds * 1000), 1)}ms")
    # JIT would compile the lateral statements for seconds (their estimates are fixed guesses per unnested key); the
    # rebuilds sort and hash millions of rows, in memory with this much; planning the statements over every
    # partition costs more than running them for a small change, so a connection plans each once and reuses it
    # (their parameters are arrays of keys that the plan does not depend on).
    await conn.execute(
        "SELECT set_config('jit', 'off', true), set_config('work_mem', $1, true), "
        "set_config('plan_cache_mode', 'force_generic_plan', true)",
        _WORK_MEM,
    )


async def _consume(conn: asyncpg.Connection, family: Family, timezone: str) -> asyncpg.Record:
    record: asyncpg.Record = await conn.fetchrow(_CONSUME, family.value, _zone(family, timezone))
    return record


async def _merge(conn: asyncpg.Connection, table: str, sql: str, *args: Any) -> ViewRefresh:
    row = await conn.fetchrow(sql, *args)
    return ViewRefresh(table, row["rows"], row["upserted"], row["deleted"])


async def _replace(conn: asyncpg.Connection, rollup: _Rollup, *args: Any) -> ViewRefresh:
    deleted = _row_count(await conn.execute(f"DELETE FROM {rollup.table}"))
    inserted = _row_count(await conn.execute(rollup.insert_all_sql, *args))
    return ViewRefresh(rollup.table, inserted, inserted, deleted)


def _row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])  # "DELETE 12", "INSERT 0 12"


async def _step(progress: ProgressFn | None, fraction: float, message: str) -> None:
    if progress is not None:
        await progress(fraction, message)


async def _too_many(conn: asyncpg.Connection, family: Family, keys: int) -> str:
    """Why recomputing `keys` hours or days would cost more than a rebuild, or "" when it would not."""
    total = await conn.fetchval(_KEYS_IN[family])
    if keys <= max(REBUILD_SHARE * total, 1):
        return ""
    unit = "hours" if family is Family.REALTIME else "days"
    return f"{keys} of {total} {unit} changed (over {REBUILD_SHARE:.0%}): rebuilt"


async def _refresh_realtime(conn: asyncpg.Connection, started: float, progress: ProgressFn | None) -> RefreshOutcome:
    await _step(progress, 0.0, "reading the invalidation log")
    consumed = await _consume(conn, Family.REALTIME, "UTC")
    hours: list[datetime] = consumed["hours"]
    reason = await _too_many(conn, Family.REALTIME, len(hours)) if hours else ""
    if reason:
        return await _rebuild(conn, [Family.REALTIME], "UTC", reason, started, progress, len(consumed["buckets"]))
    view = ViewRefresh(_HOURLY.table, 0, 0, 0)
    if hours:
        await _step(progress, 0.3, f"recomputing {len(hours)} hours")
        view = await _merge(conn, _HOURLY.table, _HOURLY.partial_sql, hours)
    return RefreshOutcome(
        Family.REALTIME.value, "incremental", False, "", len(consumed["buckets"]), len(hours), 0, [view],
        time.perf_counter() - started,
    )  # fmt: skip


async def _refresh_daily(
    conn: asyncpg.Connection, timezone: str, started: float, progress: ProgressFn | None
) -> RefreshOutcome:
    await _step(progress, 0.0, "reading the invalidation log")
    consumed = await _consume(conn, Family.DAILY, timezone)
    buckets: list[datetime] = consumed["buckets"]
    reason = await _too_many(conn, Family.DAILY, len(consumed["days"])) if buckets else ""
    if reason:
        return await _rebuild(conn, [Family.DAILY], timezone, reason, started, progress, len(buckets))
    views = [ViewRefresh(rollup.table, 0, 0, 0) for rollup in _ROLLUPS[Family.DAILY]]
    days: list[date] = []
    if buckets:
        await _step(progress, 0.2, f"first orders of the customers in {len(buckets)} buckets")
        first = await conn.fetchrow(_FIRST_ORDERS_PARTIAL, timezone, buckets, consumed["days"])
        views[0] = ViewRefresh(FIRST_ORDERS, first["rows"], first["upserted"], first["deleted"])
        days = first["days"]
        for k, rollup in enumerate(_ROLLUPS[Family.DAILY][1:], 1):
            await _step(progress, 0.2 + 0.2 * k, f"recomputing {len(days)} days of {rollup.table}")
            views[k] = await _merge(conn, rollup.table, rollup.partial_sql, timezone, days)
    return RefreshOutcome(
        Family.DAILY.value, "incremental", False, "", len(buckets), 0, len(days), views, time.perf_counter() - started
    )


async def _rebuild(
    conn: asyncpg.Connection,
    families: Sequence[Family],
    timezone: str,
    reason: str,
    started: float,
    progress: ProgressFn | None,
    consumed: int = 0,
) -> RefreshOutcome:
    """Rebuild the families' rollups from orders and clear their log (`consumed`: buckets the caller already took
    from it). The log goes first: a change committed after that keeps its row, and the rebuild's later statements
    see it anyway (recomputing it again is harmless)."""
    buckets = consumed
    views: list[ViewRefresh] = []
    rollups = [(family, rollup) for family in families for rollup in _ROLLUPS[family]]
    for family in families:
        buckets += len((await _consume(conn, family, timezone))["buckets"])
    for k, (family, rollup) in enumerate(rollups):
        await _step(progress, k / len(rollups), f"rebuilding {rollup.table}")
        args = (timezone,) if family is Family.DAILY and rollup is not _FIRST_ORDERS else ()
        views.append(await _replace(conn, rollup, *args))
    for family in families:
        await conn.execute(_MARK_BUILT, family.value, _zone(family, timezone))
    rows = {v.view: v.rows for v in views}
    return RefreshOutcome(
        families[0].value if len(families) == 1 else "all", "rebuild", False, reason, buckets,
        rows.get(_HOURLY.table, 0), rows.get(_DAILY_SUMMARY.table, 0), views, time.perf_counter() - started,
    )  # fmt: skip
