"""The monthly partitions of `orders` and `order_items`: what exists (read from the catalog), creating the coming
months, and retiring an old one: DETACH ... CONCURRENTLY (or FINALIZE of an interrupted one), then DROP TABLE.

Names of partitions and parents are read from the catalog already quoted (`format('%I.%I', schema, name)`) and are
never built from input. A partition is identified by its oid and its name together: an oid alone can be reused.
The ledger `order_partition_drops` gets a row before a partition is detached and marks it dropped in the DROP's own
transaction, so a partition a killed run left detached (or pending detach) is found and finished by the next run.

DETACH CONCURRENTLY cannot run in a transaction block: these statements run on a dedicated connection in autocommit
(asyncpg runs each statement on its own unless a transaction is open), with a short `lock_timeout`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

import asyncpg

PARENTS = ("public.orders", "public.order_items")
ITEMS_PARENT = "public.order_items"

# One key for everything that changes the partition set: two retention runs, or a retention run and a premake run,
# never overlap. Session-level on the retention run's dedicated connection (its DETACHes commit on their own),
# transaction-level for the premake.
_LOCK_KEY = "hashtext('salesdash:order_partitions')"


class PartitionState(StrEnum):
    ATTACHED = "attached"
    PENDING = "pending"  # DETACH CONCURRENTLY was interrupted: FINALIZE completes it
    DETACHED = "detached"  # a standalone table: only the DROP is left
    GONE = "gone"


@dataclass(frozen=True)
class Partition:
    parent: str  # quoted, schema-qualified
    name: str  # quoted, schema-qualified
    relid: int
    range_from: datetime | None  # None: MINVALUE, DEFAULT or a bound that is not a plain FROM/TO range
    range_to: datetime | None  # None: MAXVALUE, DEFAULT or not a plain range: never dropped
    leaf: bool  # a plain table (a sub-partitioned partition is never dropped)
    pending: bool  # pg_inherits.inhdetachpending
    rows_estimate: int
    bytes: int


@dataclass(frozen=True)
class LedgerEntry:
    """An open row of `order_partition_drops` (state `detaching`) and what its table is now."""

    partition: Partition
    state: PartitionState


# The bound text is `FOR VALUES FROM ('...') TO ('...')` for a range partition on one column; the literals carry
# their UTC offset, so they cast back to the same instants whatever the session's TimeZone.
_PARTITIONS = r"""
SELECT format('%I.%I', pn.nspname, p.relname) AS parent,
       format('%I.%I', n.nspname, c.relname) AS name,
       c.oid::bigint AS relid,
       b.bound[1]::timestamptz AS range_from,
       b.bound[2]::timestamptz AS range_to,
       c.relkind = 'r' AS leaf,
       i.inhdetachpending AS pending,
       greatest(c.reltuples, 0)::bigint AS rows_estimate,
       pg_total_relation_size(c.oid) AS bytes
  FROM pg_inherits i
  JOIN pg_class p ON p.oid = i.inhparent
  JOIN pg_namespace pn ON pn.oid = p.relnamespace
  JOIN pg_class c ON c.oid = i.inhrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 CROSS JOIN LATERAL (SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                         '^FOR VALUES FROM \(''([^'']+)''\) TO \(''([^'']+)''\)$') AS bound) b
 WHERE i.inhparent = ANY ($1::regclass[])"""

_LEDGER = r"""
SELECT d.parent, d.partition AS name, d.relid::bigint AS relid, d.range_from, d.range_to, true AS leaf,
       coalesce(i.inhdetachpending, false) AS pending, d.rows_estimate, d.bytes,
       CASE WHEN c.oid IS NULL THEN 'gone'
            WHEN i.inhrelid IS NULL THEN 'detached'
            WHEN i.inhdetachpending THEN 'pending'
            ELSE 'attached' END AS state
  FROM order_partition_drops d
  LEFT JOIN (pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace)
         ON c.oid = d.relid AND format('%I.%I', n.nspname, c.relname) = d.partition
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
 WHERE d.state = 'detaching'"""

_STATE = """
SELECT CASE WHEN c.oid IS NULL THEN 'gone'
            WHEN i.inhrelid IS NULL THEN 'detached'
            WHEN i.inhdetachpending THEN 'pending'
            ELSE 'attached' END
  FROM (SELECT 1) one
  LEFT JOIN (pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace)
         ON c.oid = $1::oid AND format('%I.%I', n.nspname, c.relname) = $2
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"""

_RECORD_INTENT = """
INSERT INTO order_partition_drops (parent, partition, relid, range_from, range_to, rows_estimate, bytes, state, job_id)
VALUES ($1, $2, $3::oid, $4, $5, $6, $7, 'detaching', $8)
ON CONFLICT (relid) WHERE state = 'detaching' DO NOTHING"""
_MARK_DROPPED = "UPDATE order_partition_drops SET state = 'dropped', dropped_at = now() "
_MARK_DROPPED_WHERE = "WHERE relid = $1::oid AND partition = $2 AND state = 'detaching'"
_FORGET_INTENT = "DELETE FROM order_partition_drops WHERE relid = $1::oid AND partition = $2 AND state = 'detaching'"

# The partitions ensure_order_partitions (migration 0001) would create for [$1, $2] (same names, same test), named
# like the catalog's: quoted and schema-qualified.
_MISSING = """
SELECT format('public.%I', format('%s_p%s', parent, to_char(month, 'YYYY_MM'))) AS name
  FROM generate_series(date_trunc('month', $1::date), date_trunc('month', $2::date), interval '1 month') AS month
 CROSS JOIN unnest(ARRAY['orders', 'order_items']) AS parent
 WHERE to_regclass(format('public.%I', format('%s_p%s', parent, to_char(month, 'YYYY_MM')))) IS NULL
 ORDER BY month, parent"""


@asynccontextmanager
async def dedicated_connection(
    dsn: str, *, lock_timeout_s: float, application_name: str
) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own (not from a pool), in autocommit. `client_connection_check_interval` makes its
    backend notice a killed worker within 2 s even while it waits for a lock, so it does not hold the session lock
    (or finish a detach nobody will drop) long after its worker is gone."""
    conn = await asyncpg.connect(
        dsn,
        server_settings={
            "application_name": application_name,
            "lock_timeout": f"{max(int(lock_timeout_s * 1000), 1)}ms",
            "client_connection_check_interval": "2000",
        },
    )
    try:
        yield conn
    finally:
        await conn.close()


async def try_session_lock(conn: asyncpg.Connection) -> bool:
    """The partition-set lock for as long as `conn` lives (closing it releases the lock)."""
    return bool(await conn.fetchval(f"SELECT pg_try_advisory_lock({_LOCK_KEY})"))


async def try_transaction_lock(conn: asyncpg.Connection) -> bool:
    """The same lock until the current transaction ends."""
    return bool(await conn.fetchval(f"SELECT pg_try_advisory_xact_lock({_LOCK_KEY})"))


async def db_now(conn: asyncpg.Connection) -> datetime:
    """The database's clock: the one the partitions' bounds and the orders' timestamps are compared with."""
    now: datetime = await conn.fetchval("SELECT now()")
    return now


def retirement_order(partition: Partition) -> tuple[bool, datetime | None, bool]:
    """Oldest first (unbounded last); within a month, order_items before the orders its rows belong to."""
    return partition.range_to is None, partition.range_to, partition.parent != ITEMS_PARENT


async def list_partitions(conn: asyncpg.Connection) -> list[Partition]:
    """Every partition of orders and order_items, in `retirement_order`."""
    rows = await conn.fetch(_PARTITIONS, list(PARENTS))
    return sorted((Partition(**dict(row)) for row in rows), key=retirement_order)


async def open_ledger_entries(conn: asyncpg.Connection) -> list[LedgerEntry]:
    """Partitions a run started to retire and did not finish, oldest first."""
    entries = []
    for row in await conn.fetch(_LEDGER):
        fields = dict(row)
        state = PartitionState(fields.pop("state"))
        entries.append(LedgerEntry(Partition(**fields), state))
    return sorted(entries, key=lambda entry: retirement_order(entry.partition))


async def partition_state(conn: asyncpg.Connection, partition: Partition) -> PartitionState:
    return PartitionState(await conn.fetchval(_STATE, partition.relid, partition.name))


async def record_intent(conn: asyncpg.Connection, partition: Partition, job_id: str | None) -> None:
    """The ledger row, committed before the detach starts (idempotent: one open row per table)."""
    p = partition
    await conn.execute(
        _RECORD_INTENT, p.parent, p.name, p.relid, p.range_from, p.range_to, p.rows_estimate, p.bytes, job_id
    )


async def forget_intent(conn: asyncpg.Connection, partition: Partition) -> None:
    """Drop the ledger row of a partition that is still attached: its detach never took effect."""
    await conn.execute(_FORGET_INTENT, partition.relid, partition.name)


async def mark_dropped(conn: asyncpg.Connection, partition: Partition) -> None:
    await conn.execute(_MARK_DROPPED + _MARK_DROPPED_WHERE, partition.relid, partition.name)


async def detach(conn: asyncpg.Connection, partition: Partition, *, finalize: bool) -> None:
    """DETACH ... CONCURRENTLY (autocommit), or FINALIZE one that was interrupted. Names come from the catalog,
    quoted there. A lock timeout inside CONCURRENTLY's second transaction leaves the partition pending: the caller
    finalizes it on its next try."""
    keyword = "FINALIZE" if finalize else "CONCURRENTLY"
    await conn.execute(f"ALTER TABLE {partition.parent} DETACH PARTITION {partition.name} {keyword}")


async def drop_detached(conn: asyncpg.Connection, partition: Partition) -> None:
    """DROP the detached table and close its ledger row, in one transaction. The DROP locks only that table."""
    async with conn.transaction():
        state = await partition_state(conn, partition)
        if state in (PartitionState.ATTACHED, PartitionState.PENDING):
            raise RuntimeError(f"{partition.name} is {state.value}, not detached: refusing to drop it")
        if state is PartitionState.DETACHED:
            await conn.execute(f"DROP TABLE {partition.name}")
        await mark_dropped(conn, partition)


async def missing_partitions(conn: asyncpg.Connection, first: date, last: date) -> list[str]:
    """Names of the partitions `create_partitions(first, last)` would create."""
    return [row["name"] for row in await conn.fetch(_MISSING, first, last)]


async def create_partitions(conn: asyncpg.Connection, first: date, last: date) -> list[str]:
    """Create the monthly partitions of both tables for the UTC months of [first, last] that lack one (the
    migration's ensure_order_partitions), in one transaction; returns their names."""
    async with conn.transaction():
        names = await missing_partitions(conn, first, last)
        if names:
            await conn.execute("SELECT ensure_order_partitions($1, $2)", first, last)
    return names
