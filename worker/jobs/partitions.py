"""Order partition maintenance: retention (`clean_old_order_partitions`) and premake (`create_order_partitions`).

Retention drops the monthly partitions of orders and order_items whose whole range ended before the cutoff: the
start of the local month (SALESDASH_TIMEZONE) `retention_months` before the current one. Partitions are UTC months,
so in a zone east of UTC the last UTC month before the cutoff still holds a few hours of a kept local month and
stays. Guards, each on its own: never a partition whose range has not ended (the current month, a future one),
never one without a plain range (DEFAULT, MINVALUE/MAXVALUE) or a sub-partitioned one, and never the last partition
of a table that would have none left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, TypeVar

import asyncpg

from db.queries.partitions import (
    LedgerEntry,
    Partition,
    PartitionState,
    create_partitions,
    db_now,
    dedicated_connection,
    detach,
    drop_detached,
    forget_intent,
    list_partitions,
    missing_partitions,
    open_ledger_entries,
    partition_state,
    record_intent,
    retirement_order,
    try_session_lock,
    try_transaction_lock,
)
from salesdash.connections import database_url
from salesdash.periods import Month
from worker.progress import report_progress

PREMAKE_MONTHS = 3  # partitions exist for the current month and this many after it
MIN_RETENTION_MONTHS = 3
LOCK_TRIES = 5  # per DETACH, FINALIZE or DROP; then the lock timeout error fails the try (the platform retries it)
LOCK_RETRY_PAUSE_S = 1.0  # doubled after each timeout

T = TypeVar("T")


@dataclass(frozen=True)
class RetentionPlan:
    drops: list[Partition]  # in retirement order
    kept_last: list[str] = field(default_factory=list)  # old enough, but the last partition of their table
    blocked: list[str] = field(default_factory=list)  # why a table's drops were left out


def retention_cutoff(now: datetime, tz: tzinfo, months: int) -> datetime:
    """The first instant of the local month `months` before the current one: everything before it is old."""
    if months < MIN_RETENTION_MONTHS:
        raise ValueError(f"retention_months must be at least {MIN_RETENTION_MONTHS}, got {months}")
    return Month.of(now.astimezone(tz).date()).plus(-months).bounds(tz)[0]


def premake_range(now: datetime, tz: tzinfo) -> tuple[date, date]:
    """UTC days whose months need a partition: from today to the last instant of the local month PREMAKE_MONTHS
    ahead (west of UTC, that instant is already in the next UTC month)."""
    end = Month.of(now.astimezone(tz).date()).plus(PREMAKE_MONTHS + 1).bounds(tz)[0] - timedelta(microseconds=1)
    return now.astimezone(UTC).date(), end.astimezone(UTC).date()


def _old_enough(partition: Partition, cutoff: datetime, now: datetime) -> bool:
    end = partition.range_to
    return partition.leaf and end is not None and end <= cutoff and end <= now


def plan_retention(partitions: list[Partition], cutoff: datetime, now: datetime) -> RetentionPlan:
    """Which partitions go, oldest first. A table keeps at least one attached partition; a table with a pending
    detach of a partition that is not old enough keeps everything (PostgreSQL allows one pending detach per table,
    and that one is someone else's to finish)."""
    plan = RetentionPlan(drops=[])
    for parent in sorted({p.parent for p in partitions}):
        own = [p for p in partitions if p.parent == parent]
        old = sorted((p for p in own if _old_enough(p, cutoff, now)), key=retirement_order)
        foreign_pending = [p.name for p in own if p.pending and p not in old]
        if foreign_pending:
            plan.blocked.append(f"{parent}: {foreign_pending[0]} is pending detach but within retention")
            continue
        if not any(p not in old and not p.pending for p in own) and old:
            plan.kept_last.append(old.pop().name)  # the newest old one stays: the table's last partition
        plan.drops.extend(old)
    plan.drops.sort(key=retirement_order)
    return plan


async def _with_lock_retries(action: Callable[[], Awaitable[T]], tries: int, pause_s: float) -> tuple[T, int]:
    """Run `action`, again after a lock timeout (SQLSTATE 55P03) up to `tries` times; returns its value and the
    tries it took. A short lock_timeout plus retries keeps a waiting DDL from queueing every reader behind it."""
    for attempt in range(1, tries + 1):
        try:
            return await action(), attempt
        except asyncpg.LockNotAvailableError:
            if attempt == tries:
                raise
            await asyncio.sleep(pause_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Retired:
    partition: Partition
    finalized: bool  # finished a detach an earlier run (or someone) left pending
    tries: int


async def _retire(
    conn: asyncpg.Connection, partition: Partition, job_id: str | None, tries: int, pause_s: float
) -> Retired:
    """Detach (or finish detaching) then drop one partition, recording the intent first."""
    await record_intent(conn, partition, job_id)
    finalized = False

    async def step() -> None:
        nonlocal finalized
        state = await partition_state(conn, partition)
        if state in (PartitionState.ATTACHED, PartitionState.PENDING):
            finalized = finalized or state is PartitionState.PENDING
            await detach(conn, partition, finalize=state is PartitionState.PENDING)
        await drop_detached(conn, partition)

    _, used = await _with_lock_retries(step, tries, pause_s)
    return Retired(partition, finalized, used)


def _partition_record(retired: Retired) -> dict[str, Any]:
    p = retired.partition
    return {
        "parent": p.parent,
        "partition": p.name,
        "from": p.range_from.isoformat() if p.range_from else None,
        "to": p.range_to.isoformat() if p.range_to else None,
        "rows_estimate": p.rows_estimate,
        "bytes": p.bytes,
        "finalized": retired.finalized,
        "tries": retired.tries,
    }


async def _finish_ledger(
    conn: asyncpg.Connection, entries: list[LedgerEntry], job_id: str | None, tries: int, pause_s: float
) -> list[Retired]:
    """Finish what a killed run left: a pending detach (FINALIZE) or a detached table (DROP); a table still
    attached never started detaching, so its row goes and the plan decides about it afresh."""
    finished = []
    for entry in entries:
        if entry.state is PartitionState.ATTACHED:
            await forget_intent(conn, entry.partition)
        else:
            finished.append(await _retire(conn, entry.partition, job_id, tries, pause_s))
    return finished


async def clean_old_order_partitions(
    ctx: dict[str, Any], *, dry_run: bool = False, retention_months: int | None = None
) -> dict[str, Any]:
    settings = ctx["settings"]
    months = retention_months if retention_months is not None else settings.order_retention_months
    dsn, job_id = database_url(settings), ctx.get("job_id")
    async with dedicated_connection(
        dsn, lock_timeout_s=settings.partition_lock_timeout, application_name="salesdash:clean_old_order_partitions"
    ) as conn:
        if not await try_session_lock(conn):
            return {"dry_run": dry_run, "skipped": True, "reason": "another partition maintenance run holds the lock"}
        now = await db_now(conn)
        cutoff = retention_cutoff(now, settings.tzinfo, months)
        first, last = premake_range(now, settings.tzinfo)
        result = {
            "dry_run": dry_run,
            "skipped": False,
            "retention_months": months,
            "timezone": settings.timezone,
            "cutoff": cutoff.isoformat(),
        }
        if dry_run:
            return {**result, **await _dry_run(conn, cutoff, now, first, last)}
        return {**result, **await _run(ctx, conn, cutoff, now, (first, last), job_id)}


async def _dry_run(
    conn: asyncpg.Connection, cutoff: datetime, now: datetime, first: date, last: date
) -> dict[str, Any]:
    """What a run would do now, changing nothing."""
    ledger = await open_ledger_entries(conn)
    plan = plan_retention(await list_partitions(conn), cutoff, now)
    unfinished = [e for e in ledger if e.state is not PartitionState.ATTACHED]
    pending = [Retired(e.partition, e.state is PartitionState.PENDING, 0) for e in unfinished]
    return {
        "created": await missing_partitions(conn, first, last),
        "finished": [_partition_record(r) for r in pending],
        "dropped": [_partition_record(Retired(p, p.pending, 0)) for p in plan.drops],
        "kept_last": plan.kept_last,
        "blocked": plan.blocked,
    }


async def _run(
    ctx: dict[str, Any],
    conn: asyncpg.Connection,
    cutoff: datetime,
    now: datetime,
    premake: tuple[date, date],
    job_id: str | None,
) -> dict[str, Any]:
    tries, pause = LOCK_TRIES, LOCK_RETRY_PAUSE_S
    await report_progress(ctx, 0.0, "creating the coming months' partitions")
    created, _ = await _with_lock_retries(lambda: create_partitions(conn, *premake), tries, pause)
    finished = await _finish_ledger(conn, await open_ledger_entries(conn), job_id, tries, pause)
    plan = plan_retention(await list_partitions(conn), cutoff, now)
    dropped = []
    for index, partition in enumerate(plan.drops):
        await report_progress(ctx, 0.1 + 0.9 * index / len(plan.drops), f"dropping {partition.name}")
        dropped.append(await _retire(conn, partition, job_id, tries, pause))
    return {
        "created": created,
        "finished": [_partition_record(r) for r in finished],
        "dropped": [_partition_record(r) for r in dropped],
        "kept_last": plan.kept_last,
        "blocked": plan.blocked,
    }


async def create_order_partitions(ctx: dict[str, Any]) -> dict[str, Any]:
    """The premake alone, daily: partitions for the current month and the next PREMAKE_MONTHS."""
    settings = ctx["settings"]
    async with ctx["db"].acquire() as conn, conn.transaction():
        if not await try_transaction_lock(conn):
            return {"skipped": True, "reason": "another partition maintenance run holds the lock", "created": []}
        await conn.execute(
            "SELECT set_config('lock_timeout', $1, true)", f"{int(settings.partition_lock_timeout * 1000)}ms"
        )
        first, last = premake_range(await db_now(conn), settings.tzinfo)
        created = await create_partitions(conn, first, last)
    return {"skipped": False, "created": created, "through": str(Month.of(last))}
