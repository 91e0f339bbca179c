"""Analytics materialized views: refresh one at a time under an advisory lock, never two runs at once."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

REALTIME_VIEWS = ("mv_hourly_sales_metrics",)
DAILY_VIEWS = ("mv_daily_sales_summary", "mv_daily_product_sales", "mv_daily_category_sales")
ALL_VIEWS = REALTIME_VIEWS + DAILY_VIEWS


@dataclass(frozen=True)
class RefreshOutcome:
    view: str
    refreshed: bool  # False: another run holds the view's lock, so this one skipped it
    concurrently: bool
    rows: int
    seconds: float


async def refresh_view(conn: asyncpg.Connection, view: str, lock_timeout: str = "5s") -> RefreshOutcome:
    if view not in ALL_VIEWS:
        raise ValueError(f"unknown materialized view {view!r}")
    started = time.perf_counter()
    async with conn.transaction():
        got_lock = await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('salesdash:mv:' || $1))", view)
        if not got_lock:
            return RefreshOutcome(view, False, False, 0, time.perf_counter() - started)
        await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        populated = await conn.fetchval("SELECT ispopulated FROM pg_matviews WHERE matviewname = $1", view)
        # CONCURRENTLY keeps readers unblocked but is illegal on a never-populated view
        quoted = _quote_ident(view)
        keyword = "CONCURRENTLY " if populated else ""
        await conn.execute(f"REFRESH MATERIALIZED VIEW {keyword}{quoted}")
        rows = await conn.fetchval(f"SELECT count(*) FROM {quoted}")
    return RefreshOutcome(view, True, bool(populated), rows, time.perf_counter() - started)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
