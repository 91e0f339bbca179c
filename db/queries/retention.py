"""Retention of the tables that grow: old rows deleted in bounded batches.

Each batch is one statement in its own transaction (autocommit), `DELETE ... WHERE ctid IN (SELECT ctid ... LIMIT
n)`: PostgreSQL finds up to n old rows (through the index on the age column where there is one) and deletes them by
their physical address (a TID scan), so a batch holds its row locks briefly, writes a bounded amount of WAL, and
vacuum can reclaim the space while the next batches run. The loop stops at the first batch that finds fewer than n.
A run killed midway has committed whole batches only; the next run deletes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

BATCH_ROWS = 10_000


@dataclass(frozen=True)
class RetentionRule:
    table: str
    condition: str  # old rows; $1 is the cutoff
    by_date: bool  # the cutoff is a (local) date rather than an instant


# Reports: by the end of the period they cover (a report regenerated today about an old month is still old).
# Notifications: sent or failed ones; a pending one is undelivered work, left to its sender.
RULES = (
    RetentionRule("reports", "period_end < $1::date", by_date=True),
    RetentionRule("notifications", "created_at < $1::timestamptz AND status <> 'pending'", by_date=False),
    RetentionRule("customer_segment_history", "changed_at < $1::timestamptz", by_date=False),
)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def delete_batch(conn: asyncpg.Connection, rule: RetentionRule, cutoff: date | datetime, batch_rows: int) -> int:
    """Delete up to `batch_rows` old rows of the rule's table in one statement; returns how many went."""
    table = _quote_ident(rule.table)
    status = await conn.execute(
        f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE {rule.condition} LIMIT $2)",
        cutoff,
        batch_rows,
    )
    return int(status.split()[-1])
